"""The learnable reversible coupling z = f + a·z_{k-2} + b·z_{k-1} in one pass forward and one backward.

Plain torch evaluates it as four tensor passes forward (two products, two sums, each a new tensor) and six back
(a·g, b·g, g·z_{k-2}, g·z_{k-1} and their two sums). csrc/coupling.cpp reads the three inputs once and writes z,
rounded exactly as torch rounds ((f + a·z2) + b·z1), so the output is bit for bit the plain one; backward reads
g, z2, z1 once, writes a·g and b·g (bit for bit autograd's) and sums a's and b's gradients in float64 (equal to
autograd's float32 sums to float rounding). Inputs are made contiguous first where they are views (the first
coupling's z_{k-2} is the transposed token stream).

`coupled_sum` uses it for CPU float32 tensors of one shape outside tracing/export/compilation, when the kernel
builds (built on first use like the LIF kernel) and BESTCOMPRESS_COUPLING is not `torch`; otherwise the plain
expression.
"""
from __future__ import annotations

import torch

from .extensions import compiled_once

_state: dict = {}


def _cpp():
    """The compiled kernels, or None (no compiler / headers, or BESTCOMPRESS_COUPLING=torch)."""
    return compiled_once(_state, "mod", "bestcompress_coupling", "coupling.cpp", "BESTCOMPRESS_COUPLING",
                         flags=("-O3", "-ffp-contract=off"))


class _Coupling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, z2, z1, a, b):
        z2c, z1c = z2.contiguous(), z1.contiguous()
        af, bf = float(a), float(b)
        ctx.save_for_backward(z2c, z1c)
        ctx.coef = (af, bf)
        ctx.dtypes = (a.dtype, b.dtype)
        return _cpp().coupling_forward(f.contiguous(), z2c, z1c, af, bf)

    @staticmethod
    def backward(ctx, g):
        z2, z1 = ctx.saved_tensors
        af, bf = ctx.coef
        d2, d1, da, db = _cpp().coupling_backward(g.contiguous(), z2, z1, af, bf)
        need = ctx.needs_input_grad
        return (g if need[0] else None, d2 if need[1] else None, d1 if need[2] else None,
                da.to(ctx.dtypes[0]) if need[3] else None, db.to(ctx.dtypes[1]) if need[4] else None)


def _fused(f, z2, z1, a, b) -> bool:
    tensors = (f, z2, z1)
    return (all(type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu"
                and t.shape == f.shape for t in tensors)
            and f.numel() > 0 and all(isinstance(c, torch.Tensor) and c.dim() == 0 and c.device.type == "cpu"
                                      and c.dtype == torch.float32 for c in (a, b))
            and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())
            and _cpp() is not None)


def coupled_sum(f: torch.Tensor, z2: torch.Tensor, z1: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """f + a·z2 + b·z1 for 0-dim parameters a, b: the one-pass kernels where they apply, else the plain expression."""
    if _fused(f, z2, z1, a, b):
        return _Coupling.apply(f, z2, z1, a, b)
    return f + a.to(f.dtype) * z2 + b.to(f.dtype) * z1
