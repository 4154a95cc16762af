"""Modules that InsertReversibleCouplings puts into a traced model (CIE's two-stream form, METHOD.md §3).

Both are tracer leaves (`bc_leaf = True`): a second trace keeps them as single call_module nodes, so passes can
find them again (idempotence) and feature taps can hook them.
"""
from __future__ import annotations

import torch
from torch import nn

EVAL_HEADS = ("mean", "head", "head2")


class ReversibleCoupling(nn.Module):
    """z_k = F_k(z_{k-1}) + ½·(z_{k-2} + z_{k-1}); invertible: z_{k-2} = 2·(z_k − F_k(z_{k-1})) − z_{k-1}.

    Args:
        index: k, the position of the sub-block in the trunk (1 is the first attention sub-block; couplings
            exist for k >= 2, the first sub-block stays a plain residual).
        kind: 'attention' or 'mlp' (odd k are attention sub-blocks, even k MLP sub-blocks).
        where: the model part the sub-block belongs to (e.g. 'block.0.mlp'), for messages and summaries.
    """

    bc_leaf = True

    def __init__(self, index: int, kind: str, where: str = "") -> None:
        super().__init__()
        self.index = int(index)
        self.kind = kind
        self.where = where

    def forward(self, f: torch.Tensor, z_km2: torch.Tensor, z_km1: torch.Tensor) -> torch.Tensor:
        return f + 0.5 * (z_km2 + z_km1)

    def extra_repr(self) -> str:
        return f"k={self.index}, kind={self.kind}" + (f", where={self.where}" if self.where else "")


def reconstruct_previous(z_k: torch.Tensor, z_km1: torch.Tensor, f_k_of_zkm1: torch.Tensor) -> torch.Tensor:
    """The inverse of a coupling: z_{k-2} = 2·(z_k − F_k(z_{k-1})) − z_{k-1}.

    Args:
        z_k: the coupling's output stream.
        z_km1: the previous stream z_{k-1} (the sub-block's input).
        f_k_of_zkm1: F_k(z_{k-1}), the sub-block's residual branch evaluated on z_{k-1}.
    Returns:
        z_{k-2}.
    """
    return 2.0 * (z_k - f_k_of_zkm1) - z_km1


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
