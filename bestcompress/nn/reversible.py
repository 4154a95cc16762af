"""Modules that InsertReversibleCouplings puts into a traced model (CIE's two-stream form, METHOD.md §3).

A coupling computes, for the k-th residual sub-block F_k of a trunk (k >= 2):

    z_k = F_k(z_{k-1}) + a_k · z_{k-2} + b_k · z_{k-1}

and, when a_k != 0, its inverse is

    z_{k-2} = (z_k − F_k(z_{k-1}) − b_k · z_{k-1}) / a_k.

Two forms (recipe key `reversible.form`):

- `paper`: a_k = b_k = ½ fixed (the public BESTformer code): z_k = F_k(z_{k-1}) + ½(z_{k-2} + z_{k-1}). It changes
  the function a full-precision model was trained for (F_k + z_{k-1}): the identity path carries ½ instead of 1.
- `preserving`: a_k and b_k are learnable scalars (one pair per coupling) initialised at the plain residual,
  a_k = 0 and b_k = 1, so a model coupled from full-precision weights computes exactly what it computed before
  (a head2 is added beside it). Training moves them freely, e.g. toward the paper's ½/½. At a_k = 0 exactly the
  coupling is a plain residual and *not* invertible in closed form (z_{k-2} no longer enters z_k): the inverse
  exists once training has moved a_k away from 0 and `inverse` raises otherwise. We chose the exact start over
  a small ε (invertible from step 0 but not function-preserving, and ill-conditioned: errors grow by 1/ε).

With `reversible.stream_bits` = n, a coupling's output z_k is put on a signed n-bit power-of-two grid
(nn/stream_quant.py: StreamQuant, its `quant` submodule), so that the 1-bit layers reading the stream read
integers times a scale (for FINN/FPGA); the inverse is then no longer exact and `inverse` raises.

Both modules are tracer leaves (`bc_leaf = True`): a second trace keeps them as single call_module nodes, so passes
can find them again (idempotence) and feature taps can hook them.
"""
from __future__ import annotations

import torch
from torch import nn

from .coupling_kernel import coupled_sum
from .stream_quant import StreamQuant

EVAL_HEADS = ("mean", "head", "head2")
FORMS = ("preserving", "paper")
MIN_INVERTIBLE = 1e-6  # |a_k| below this: the inverse would amplify rounding errors by more than 1e6


class ReversibleCoupling(nn.Module):
    """z_k = F_k(z_{k-1}) + a_k·z_{k-2} + b_k·z_{k-1} (module docstring for the two forms and the inverse).

    Args:
        index: k, the position of the sub-block in its stage's trunk (1 is the first attention sub-block;
            couplings exist for k >= 2, the first sub-block stays a plain residual: the method's x0 = None).
        kind: 'attention' or 'mlp' (odd k are attention sub-blocks, even k MLP sub-blocks).
        where: the model part the sub-block belongs to (e.g. 'block.0.mlp'), for messages and summaries.
        form: 'preserving' (learnable a_k, b_k from 0 and 1) or 'paper' (fixed ½, ½).
        stage: the index of the trunk stage (0 for a single-stage model; stages are separated by downsampling).
        stream_bits: None (the float stream) or n: the output quantized by a StreamQuant(n) (module docstring).
    """

    bc_leaf = True

    def __init__(self, index: int, kind: str, where: str = "", form: str = "paper", stage: int = 0,
                 stream_bits: int | None = None) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        self.index = int(index)
        self.kind = kind
        self.where = where
        self.form = form
        self.stage = int(stage)
        if form == "preserving":
            self.a = nn.Parameter(torch.zeros(()))
            self.b = nn.Parameter(torch.ones(()))
        else:  # plain attributes: no state_dict entries, the form is rebuilt from the recipe
            self.a = 0.5
            self.b = 0.5
        if stream_bits is not None:  # no submodule otherwise: the float stream's state_dict is unchanged
            self.quant = StreamQuant(stream_bits)

    def coefficients(self) -> tuple[float, float]:
        """(a_k, b_k) as Python floats."""
        return float(self.a), float(self.b)

    def forward(self, f: torch.Tensor, z_km2: torch.Tensor, z_km1: torch.Tensor) -> torch.Tensor:
        if self.form == "paper":
            z = f + 0.5 * (z_km2 + z_km1)
        else:
            z = coupled_sum(f, z_km2, z_km1, self.a, self.b)  # one pass each way where it applies (coupling_kernel)
        quant = self._modules.get("quant")
        return z if quant is None else quant(z)

    def inverse(self, z_k: torch.Tensor, z_km1: torch.Tensor, f_k_of_zkm1: torch.Tensor) -> torch.Tensor:
        """z_{k-2} from z_k, z_{k-1} and F_k(z_{k-1}).

        Raises:
            ValueError: when |a_k| < 1e-6 (a plain residual: z_{k-2} does not enter z_k), or when the stream is
                quantized (rounding lost what the inverse needs).
        """
        if "quant" in self._modules:
            raise ValueError(f"coupling k={self.index} quantizes its stream (reversible.stream_bits), so z_(k-2) "
                             "cannot be reconstructed exactly; use train.memory plain or checkpoint.")
        a, b = self.coefficients()
        return reconstruct_previous(z_k, z_km1, f_k_of_zkm1, a, b)

    def extra_repr(self) -> str:
        a, b = self.coefficients()
        text = f"k={self.index}, kind={self.kind}, form={self.form}, a={a:.4g}, b={b:.4g}"
        text += f", stage={self.stage}" if self.stage else ""
        text += f", stream_bits={self.quant.bits}" if "quant" in self._modules else ""
        return text + (f", where={self.where}" if self.where else "")


def reconstruct_previous(z_k: torch.Tensor, z_km1: torch.Tensor, f_k_of_zkm1: torch.Tensor, a: float = 0.5,
                         b: float = 0.5) -> torch.Tensor:
    """The inverse of a coupling: z_{k-2} = (z_k − F_k(z_{k-1}) − b·z_{k-1}) / a.

    Args:
        z_k: the coupling's output stream.
        z_km1: the previous stream z_{k-1} (the sub-block's input).
        f_k_of_zkm1: F_k(z_{k-1}), the sub-block's residual branch evaluated on z_{k-1}.
        a, b: the coupling's coefficients (the paper's ½, ½ by default).
    Returns:
        z_{k-2}.
    Raises:
        ValueError: when |a| < 1e-6 (the coupling is a plain residual and has no closed-form inverse).
    """
    if abs(a) < MIN_INVERTIBLE:
        raise ValueError(f"the coupling's a_k = {a:.3g} is (almost) 0: it is a plain residual, z_(k-2) does not "
                         "enter z_k, so it cannot be reconstructed (train the model so that a_k moves, or use "
                         "reversible.form=paper).")
    return (z_k - f_k_of_zkm1 - b * z_km1) / a


class DualHeadOutput(nn.Module):
    """Joins the two classifier heads: (head, head2) while training, their mean (or one of them) in eval.

    Args:
        eval_heads: 'mean' (the paper: average of head on the last attention stream and head2 on the last MLP
            stream), 'head' or 'head2' (evaluate with that head alone).
    """

    bc_leaf = True

    def __init__(self, eval_heads: str = "mean") -> None:
        super().__init__()
        if eval_heads not in EVAL_HEADS:
            raise ValueError(f"eval_heads must be one of {', '.join(EVAL_HEADS)}, got {eval_heads!r}")
        self.eval_heads = eval_heads

    def forward(self, head: torch.Tensor, head2: torch.Tensor):
        if self.training:
            return head, head2
        if self.eval_heads == "head":
            return head
        if self.eval_heads == "head2":
            return head2
        return (head + head2) / 2

    def extra_repr(self) -> str:
        return f"eval_heads={self.eval_heads}"
