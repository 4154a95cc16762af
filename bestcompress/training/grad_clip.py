"""Gradient clipping whose norm does not overflow: `clip_grad_norm_` sums squares in the gradients' dtype, so
finite fp32 gradients above ~1e19 give an infinite norm (and are scaled to zero). A freshly initialised spiking
network reaches such gradients: a silent neuron feeds a BatchNorm a constant input, whose backward multiplies by
1/sqrt(eps) (316 at eps=1e-5), and a few in series per block compound over the depth (Meta-SpikeFormer's silent
attention before three BatchNorms: ~1e30 after 8 blocks). Such a step is finite once clipped; only a gradient
that is itself NaN or Inf is not, and then the norm returned is not finite."""
from __future__ import annotations

import torch


def _norms(grads: list[torch.Tensor], ord: float = 2.0) -> list[torch.Tensor]:
    if hasattr(torch, "_foreach_norm"):
        try:
            return list(torch._foreach_norm(grads, ord))
        except RuntimeError:  # mixed devices or dtypes: one at a time
            pass
    return [torch.linalg.vector_norm(g, ord) for g in grads]


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients of `parameters` so that their joint 2-norm is at most `max_norm`; return that norm
    before clipping (float64 where the gradients' own dtype overflowed; NaN or Inf only when a gradient is)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.linalg.vector_norm(torch.stack([n.float() for n in _norms(grads)]).cpu())
    if not torch.isfinite(norm):
        largest = torch.stack([n.float() for n in _norms(grads, float("inf"))]).cpu().max()
        if not torch.isfinite(largest):
            return largest
        # every gradient is finite: its square overflowed; float64 holds (3.4e38)^2 times any element count
        norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g, dtype=torch.float64).cpu() for g in grads]))
    scale = float(max_norm) / (float(norm) + 1e-6)
    if scale < 1.0:
        try:
            torch._foreach_mul_(grads, scale)
        except (AttributeError, RuntimeError):  # an older torch, or mixed devices/dtypes
            for g in grads:
                g.mul_(scale)
    return norm
