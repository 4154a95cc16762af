"""Which part of a model's output is the logits.

Models return more than one logits tensor: `(logits, None)`, `(logits, aux_logits)`, `{'logits': ...}`, or the
(head, head2) pair of a coupled BESTformer while training. The rule:

- a tensor is the logits;
- a dict: its 'logits' entry, else its 'out' entry (then the rule again);
- a tuple or list: Nones dropped; the pair (head, head2) only when the model is two-headed (it holds the
  DualHeadOutput that InsertReversibleCouplings adds, or says `bc_two_heads = True`); otherwise the first entry
  (auxiliary outputs follow the main one, as in timm and torchvision models);
- per-time-step logits: a 3-D tensor [T, B, K] whose second axis is the batch and whose first is the model's
  declared T (or, when it declares none, an axis other than the batch) is averaged over time, as the spiking
  models' own training scripts do (`time_note` says so once).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError

LOGIT_KEYS = ("logits", "out")


def _steps_of(model) -> int | None:
    if model is None:
        return None
    from ..model_facts import model_time_steps
    from .distributed import unwrap
    model = unwrap(model)
    steps = model_time_steps(model)
    if steps is None:
        v = getattr(model, "bc_time_steps", None)
        steps = v if isinstance(v, int) and v > 0 else None
    return steps


def is_per_step(t, steps: int | None, batch: int | None) -> bool:
    """True for logits [T, B, K] laid out per time step (the rule in the module docstring)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or batch is None or t.shape[1] != batch:
        return False
    return t.shape[0] == steps if steps is not None else t.shape[0] != batch


def _time_mean(sel, steps, batch):
    if isinstance(sel, tuple):
        return tuple(_time_mean(s, steps, batch) for s in sel)
    return sel.mean(0) if is_per_step(sel, steps, batch) else sel


def time_note(out, model, batch: int) -> str | None:
    """A sentence when the model's logits are per time step (and so averaged over time), else None."""
    try:
        sel = select_logits(out, two_headed(model) if model is not None else False)
    except ModelError:
        return None
    first = sel[0] if isinstance(sel, tuple) else sel
    if is_per_step(first, _steps_of(model), batch):
        return (f"the model returns logits per time step, shape {list(first.shape)} ([T, B, classes]); "
                "bestcompress averages them over T")
    return None


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


def select_logits(out, two_heads: bool = False, model: nn.Module | None = None, batch: int | None = None):
    """The logits in a model's output by the rule above: a tensor, or (head, head2) for a two-headed model.

    Per-time-step logits [T, B, K] are averaged over T when `batch` (the input's batch size) is given; `model`
    gives the T it declares.

    Raises:
        ModelError: no tensor could be found by the rule.
    """
    if batch is not None:
        return _time_mean(select_logits(out, two_heads), _steps_of(model), batch)
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


def mean_logits(out, two_heads: bool = False, model: nn.Module | None = None,
                batch: int | None = None) -> torch.Tensor:
    """One logits tensor: the selected logits (averaged over time as `select_logits`), or the mean of (head,
    head2)."""
    sel = select_logits(out, two_heads, model, batch)
    if isinstance(sel, tuple):
        return (sel[0].float() + sel[1].float()) / 2
    return sel
