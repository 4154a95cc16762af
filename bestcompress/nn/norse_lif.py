"""norse's LIF neurons as bestcompress neurons: BoxLIFCell (`norse.torch.LIFBoxCell`, current-free), CurrentLIFCell
(`norse.torch.LIFCell`, with a synaptic current) and CurrentLIF (`norse.torch.LIF`, the cell run over time).

BoxLIFCell: same calling convention as norse's cells (`z, state = cell(x, state)`, state None at the first step, a state with
one field `v`), same Euler step: v ← v + dt·τ_mem⁻¹·(x + v_leak − v); z = H(v − v_th) with a strict comparison
(norse's heaviside: 0 for ≤ 0); v ← (1 − z)·v + z·v_reset (norse's reset_value) or (1 − z)·v + z·(v − v_th)
(reset_subtract); the surrogate gradient is norse's SuperSpike, 1/(|x| + 1)², or none (method
'heaviside'). CanonicalizeNeurons puts it in for norse's LIFBoxCell after checking both compute the same.

CurrentLIFCell: norse's lif_feed_forward_step, state (v, i), v starting at v_leak and i at 0: i ← i + x;
v ← v + dt·τ_mem⁻¹·((v_leak − v) + i); i ← i − dt·τ_syn⁻¹·i; z = H(v − v_th); v ← (1 − z)·v + z·v_reset.
CurrentLIF takes (T, ...) input and returns (spikes of shape (T, ...), last state), as norse's LIF does.
The products are formed as norse forms them (`dt * tensor(τ⁻¹)` in float32), so the membranes agree bit for bit.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["BoxLIFCell", "BoxState", "CurrentLIF", "CurrentLIFCell", "CurrentState"]


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


def _rate(dt: float, tau_inv: float, like: torch.Tensor) -> torch.Tensor:
    """dt·τ⁻¹ as norse computes it: a Python float times a float32 0-d tensor (rounded in float32)."""
    return dt * torch.as_tensor(tau_inv, dtype=like.dtype, device=like.device)


def _fire(h: torch.Tensor, surrogate: str) -> torch.Tensor:
    return _SuperSpike.apply(h) if surrogate == "super" else (h > 0).to(h.dtype)


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
        v = v + _rate(self.dt, self.tau_mem_inv, x) * (x + self.v_leak - v)
        z = _fire(v - self.v_th, self.surrogate)
        v = (1 - z) * v + z * (self.v_reset if self.reset_mode == "value" else v - self.v_th)
        return z, BoxState(v)

    def extra_repr(self) -> str:
        return (f"tau_mem_inv={self.tau_mem_inv}, v_leak={self.v_leak}, v_th={self.v_th}, v_reset={self.v_reset}, "
                f"dt={self.dt}, reset={self.reset_mode}, surrogate={self.surrogate}")


class CurrentState(NamedTuple):
    """The state between steps (norse's LIFFeedForwardState has the same fields)."""

    v: torch.Tensor
    i: torch.Tensor


class CurrentLIFCell(nn.Module):
    """One step of norse's current-based LIF (LIFCell): `z, state = cell(x, state)` (see module doc)."""

    step_mode = "s"

    def __init__(self, tau_syn_inv: float = 200.0, tau_mem_inv: float = 100.0, v_leak: float = 0.0,
                 v_th: float = 1.0, v_reset: float = 0.0, dt: float = 1e-3, surrogate: str = "super") -> None:
        super().__init__()
        if surrogate not in ("super", "heaviside"):
            raise ValueError(f"unknown surrogate {surrogate!r}")
        self.tau_syn_inv, self.tau_mem_inv = float(tau_syn_inv), float(tau_mem_inv)
        self.v_leak, self.v_th, self.v_reset = float(v_leak), float(v_th), float(v_reset)
        self.dt, self.surrogate = float(dt), surrogate

    def step(self, x: torch.Tensor, state: CurrentState | None) -> tuple[torch.Tensor, CurrentState]:
        if state is None:
            v, i = torch.full_like(x, self.v_leak), torch.zeros_like(x)
        else:
            v, i = state[0], state[1]
        i = i + x
        v = v + _rate(self.dt, self.tau_mem_inv, x) * ((self.v_leak - v) + i)
        i = i + (-self.dt) * torch.as_tensor(self.tau_syn_inv, dtype=x.dtype, device=x.device) * i
        z = _fire(v - self.v_th, self.surrogate)
        return z, CurrentState((1 - z) * v + z * self.v_reset, i)

    def forward(self, x: torch.Tensor, state: CurrentState | None = None):
        return self.step(x, state)

    def extra_repr(self) -> str:
        return (f"tau_syn_inv={self.tau_syn_inv}, tau_mem_inv={self.tau_mem_inv}, v_leak={self.v_leak}, "
                f"v_th={self.v_th}, v_reset={self.v_reset}, dt={self.dt}, surrogate={self.surrogate}")


class CurrentLIF(CurrentLIFCell):
    """norse's LIF: CurrentLIFCell over the leading (time) axis; returns (stacked spikes, last state)."""

    step_mode = "m"

    def forward(self, x: torch.Tensor, state: CurrentState | None = None):
        outs = []
        for t in range(x.shape[0]):
            z, state = self.step(x[t], state)
            outs.append(z)
        return torch.stack(outs), state
