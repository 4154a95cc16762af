"""BoxLIFCell: norse's current-free LIF cell (`norse.torch.LIFBoxCell`) as a bestcompress neuron.

Same calling convention as norse's cells (`z, state = cell(x, state)`, state None at the first step, a state with
one field `v`), same Euler step: v ← v + dt·τ_mem⁻¹·(x + v_leak − v); z = H(v − v_th) with a strict comparison
(norse's heaviside: 0 for ≤ 0); v ← (1 − z)·v + z·v_reset (norse's reset_value) or (1 − z)·v + z·(v − v_th)
(reset_subtract); the surrogate gradient is norse's SuperSpike, 1/(|x| + 1)², or none (method
'heaviside'). CanonicalizeNeurons puts it in for norse's LIFBoxCell after checking both compute the same.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["BoxLIFCell", "BoxState"]


class BoxState(NamedTuple):
    """The cell's state between steps (norse's LIFBoxFeedForwardState has the same field)."""

    v: torch.Tensor


class _SuperSpike(torch.autograd.Function):
    """Strict heaviside forward; SuperSpike backward 1/(|x| + 1)² (norse's form, which does not use alpha)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output / (x.abs() + 1.0).pow(2)


class BoxLIFCell(nn.Module):
    """One step of a current-free LIF neuron with norse's equations and calling convention (see module doc)."""

    step_mode = "s"  # one time step per call; the model threads the state

    def __init__(self, tau_mem_inv: float = 100.0, v_leak: float = 0.0, v_th: float = 1.0, v_reset: float = 0.0,
                 dt: float = 1e-3, reset: str = "value", surrogate: str = "super") -> None:
        super().__init__()
        if reset not in ("value", "subtract") or surrogate not in ("super", "heaviside"):
            raise ValueError(f"unknown reset {reset!r} or surrogate {surrogate!r}")
        self.tau_mem_inv, self.v_leak, self.v_th, self.v_reset = float(tau_mem_inv), float(v_leak), float(v_th), \
            float(v_reset)
        self.dt, self.reset_mode, self.surrogate = float(dt), reset, surrogate

    def forward(self, x: torch.Tensor, state: BoxState | None = None):
        v = torch.full_like(x, self.v_leak) if state is None else state[0]
        v = v + self.dt * self.tau_mem_inv * (x + self.v_leak - v)
        h = v - self.v_th
        z = _SuperSpike.apply(h) if self.surrogate == "super" else (h > 0).to(x.dtype)
        v = (1 - z) * v + z * (self.v_reset if self.reset_mode == "value" else v - self.v_th)
        return z, BoxState(v)

    def extra_repr(self) -> str:
        return (f"tau_mem_inv={self.tau_mem_inv}, v_leak={self.v_leak}, v_th={self.v_th}, v_reset={self.v_reset}, "
                f"dt={self.dt}, reset={self.reset_mode}, surrogate={self.surrogate}")
