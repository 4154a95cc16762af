"""Multi-step leaky integrate-and-fire neuron (time-first input [T, B, ...])."""
from __future__ import annotations

import torch
from torch import nn


class SigmoidSurrogateSpike(torch.autograd.Function):
    """Heaviside forward; sigmoid surrogate gradient alpha*sig(alpha*x)*(1-sig(alpha*x)) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * x)
        return grad_output * ctx.alpha * sig * (1.0 - sig), None


def heaviside_spike(x: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """Spike of x = H - V_th: the surrogate Function when a gradient is needed, plain ops otherwise.

    Plain ops keep inference and export graphs free of Python autograd functions.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return SigmoidSurrogateSpike.apply(x, alpha)
    return (x >= 0).to(x.dtype)


class LIF(nn.Module):
    """Multi-step LIF: H = V + (X - (V - V_reset)) / tau, S = Heaviside(H - V_th), then reset.

    Args:
        tau: membrane time constant (> 1).
        v_threshold: firing threshold V_th.
        v_reset: reset potential for a hard reset; None selects the soft reset V = H - V_th * S.
        decay_input: if False, H = V - (V - V_reset) / tau + X (the input is not divided by tau).
        detach_reset: the reset term carries no gradient.
        alpha: sharpness of the sigmoid surrogate gradient.

    The neuron keeps no state between calls: every forward starts from V = V_reset (0 for a soft reset),
    so there is nothing to reset between batches and the time loop unrolls when exported.
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        decay_input: bool = True,
        detach_reset: bool = True,
        alpha: float = 4.0,
    ) -> None:
        super().__init__()
        if tau <= 1.0:
            raise ValueError(f"LIF tau must be > 1, got {tau}")
        self.tau = float(tau)
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.decay_input = bool(decay_input)
        self.detach_reset = bool(detach_reset)
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        reset = "soft" if self.v_reset is None else f"hard, v_reset={self.v_reset}"
        return (f"tau={self.tau}, v_threshold={self.v_threshold}, {reset}, decay_input={self.decay_input}, "
                f"detach_reset={self.detach_reset}, alpha={self.alpha}")

    def reset(self) -> None:
        """No-op: kept so code written for stateful neuron libraries runs unchanged."""

    def charge(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        base = 0.0 if self.v_reset is None else self.v_reset
        if self.decay_input:
            return v + (x - (v - base)) / self.tau
        return v - (v - base) / self.tau + x

    def fire(self, h: torch.Tensor) -> torch.Tensor:
        return heaviside_spike(h - self.v_threshold, self.alpha)

    def reset_membrane(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s_r = s.detach() if self.detach_reset else s
        if self.v_reset is None:
            return h - self.v_threshold * s_r
        return h * (1.0 - s_r) + self.v_reset * s_r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x[0])
        if self.v_reset is not None and self.v_reset != 0.0:
            v = v + self.v_reset
        out = []
        for t in range(x.shape[0]):
            h = self.charge(v, x[t])
            s = self.fire(h)
            v = self.reset_membrane(h, s)
            out.append(s)
        return torch.stack(out, 0)
