"""Memory order of dense tensors: the permutation that views a tensor's storage as a contiguous tensor.

A channels-last tensor ([N, C, H, W] with C innermost in memory, what binary convolutions produce during CPU
training, nn/channels_last.py) is not `is_contiguous()`, yet its storage is one dense block. Kernels that work on
flat memory (the fused LIF, the spike packer, the spike → uint8 converter) run on `x.permute(p)` — contiguous, a
view — and hand back results permuted by the inverse, so they keep the layout instead of copying to NCHW.
"""
from __future__ import annotations

import torch


def dense_order(x: torch.Tensor, lead: int = 0) -> list[int] | None:
    """The permutation p with `x.permute(p)` contiguous and the first `lead` dims kept first in their order (a
    time-first tensor's T stays the outer loop), or None where there is none (overlapping or gapped memory)."""
    if x.is_contiguous():
        return list(range(x.dim()))
    rest = sorted(range(lead, x.dim()), key=lambda d: (-x.stride(d), d))
    p = list(range(lead)) + rest
    return p if x.permute(p).is_contiguous() else None


def inverse(p: list[int]) -> list[int]:
    inv = [0] * len(p)
    for i, d in enumerate(p):
        inv[d] = i
    return inv


def as_dense(x: torch.Tensor, lead: int = 0) -> tuple[torch.Tensor, list[int] | None]:
    """(a contiguous tensor over x's memory, the permutation to undo with `restore`); a copy (and None) only
    where x's memory is not one dense block in such an order."""
    p = dense_order(x, lead)
    if p is None:
        return x.contiguous(), None
    if p == list(range(x.dim())):
        return x, None
    return x.permute(p), p


def restore(y: torch.Tensor, p: list[int] | None) -> torch.Tensor:
    """The inverse of `as_dense` on a result shaped like its contiguous tensor."""
    return y if p is None else y.permute(inverse(p))
