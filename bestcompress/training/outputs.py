"""Which part of a model's output is the logits.

Models return more than one logits tensor: `(logits, None)`, `(logits, aux_logits)`, `{'logits': ...}`, or the
(head, head2) pair of a coupled BESTformer while training. The rule:

- a tensor is the logits;
- a dict: its 'logits' entry, else its 'out' entry (then the rule again);
- a tuple or list: Nones dropped; the pair (head, head2) only when the model is two-headed (it holds the
  DualHeadOutput that InsertReversibleCouplings adds, or says `bc_two_heads = True`); otherwise the first entry
  (auxiliary outputs follow the main one, as in timm and torchvision models).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError

LOGIT_KEYS = ("logits", "out")


def two_headed(model: nn.Module) -> bool:
    """True for a model whose training output is the pair (head, head2) that CIE trains."""
    from ..nn.reversible import DualHeadOutput
    from .distributed import unwrap
    model = unwrap(model)
    if getattr(model, "bc_two_heads", False):
        return True
    return any(isinstance(m, DualHeadOutput) for m in model.modules())


def _describe(out) -> str:
    if isinstance(out, dict):
        return f"a dict with keys {', '.join(map(repr, out)) or 'none'}"
    return type(out).__name__


def select_logits(out, two_heads: bool = False):
    """The logits in a model's output by the rule above: a tensor, or (head, head2) for a two-headed model.

    Raises:
        ModelError: no tensor could be found by the rule.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        for key in LOGIT_KEYS:
            if key in out:
                return select_logits(out[key], two_heads)
        raise ModelError(f"The model returned {_describe(out)}; bestcompress reads the logits from the key "
                         "'logits' or 'out'.")
    if isinstance(out, (tuple, list)):
        items = [o for o in out if o is not None]
        if two_heads and len(items) == 2 and all(isinstance(o, torch.Tensor) for o in items):
            return items[0], items[1]
        if items:
            return select_logits(items[0], two_heads)  # a coupled (logits, aux) model: ((head, head2), aux)
    raise ModelError(f"The model returned {_describe(out) if out is not None else 'None'}, in which bestcompress "
                     "finds no logits tensor.")


def mean_logits(out, two_heads: bool = False) -> torch.Tensor:
    """One logits tensor: the selected logits, or the mean of (head, head2)."""
    sel = select_logits(out, two_heads)
    if isinstance(sel, tuple):
        return (sel[0].float() + sel[1].float()) / 2
    return sel
