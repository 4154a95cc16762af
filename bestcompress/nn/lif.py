"""Multi-step leaky integrate-and-fire neuron (time-first input [T, B, ...])."""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch import nn

from .lif_kernel import fused_lif
from .memory import mark_spikes, neuron_output


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


class ATanSurrogateSpike(torch.autograd.Function):
    """Heaviside forward; arctan surrogate (alpha/2) / (1 + (pi/2 * alpha * x)^2) backward (spikingjelly/snntorch ATan)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, strict: bool = False) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return ((x > 0) if strict else (x >= 0)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * (ctx.alpha / 2) / (1 + (math.pi / 2 * ctx.alpha * x) ** 2), None, None


class _StrictSigmoidSurrogateSpike(SigmoidSurrogateSpike):
    """SigmoidSurrogateSpike with a strict comparison (x > 0 fires), as snntorch fires."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x > 0).to(x.dtype)


SURROGATES = ("sigmoid", "atan")


def heaviside_spike(x: torch.Tensor, alpha: float = 4.0, surrogate: str = "sigmoid",
                    strict: bool = False) -> torch.Tensor:
    """Spike of x = H - V_th: the surrogate Function when a gradient is needed, plain ops otherwise.

    Plain ops keep inference and export graphs free of Python autograd functions.
    `surrogate` picks the gradient ('sigmoid' or 'atan'); `strict` fires on x > 0 instead of x >= 0.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        if surrogate == "atan":
            return mark_spikes(ATanSurrogateSpike.apply(x, alpha, strict))
        return mark_spikes((_StrictSigmoidSurrogateSpike if strict else SigmoidSurrogateSpike).apply(x, alpha))
    return ((x > 0) if strict else (x >= 0)).to(x.dtype)


class LIF(nn.Module):
    """Multi-step LIF: H = V + (X - (V - V_reset)) / tau, S = Heaviside(H - V_th), then reset.

    Args:
        tau: membrane time constant (> 1).
        v_threshold: firing threshold V_th.
        v_reset: reset potential for a hard reset; None selects the soft reset V = H - V_th * S.
        decay_input: if False, H = V - (V - V_reset) / tau + X (the input is not divided by tau).
        detach_reset: the reset term carries no gradient.
        alpha: sharpness of the surrogate gradient.
        surrogate: 'sigmoid' (default, alpha*sig(alpha*x)*(1-sig(alpha*x))) or 'atan' (spikingjelly/snntorch ATan).
        step_mode: 'm' (default): input [T, B, ...], stateless. 's': one time step per call, the membrane is
            kept in `self.v` between calls (for models that loop over time themselves) until `reset()`, or
            until `period` calls have been made when `period` is set (then the next call starts afresh).

    In multi-step mode the neuron keeps no state between calls: every forward starts from V = V_reset (0 for a
    soft reset), so there is nothing to reset between batches and the time loop unrolls when exported.
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        decay_input: bool = True,
        detach_reset: bool = True,
        alpha: float = 4.0,
        surrogate: str = "sigmoid",
        step_mode: str = "m",
        period: int | None = None,
    ) -> None:
        super().__init__()
        if tau <= 1.0:
            raise ValueError(f"LIF tau must be > 1, got {tau}")
        if surrogate not in SURROGATES:
            raise ValueError(f"LIF surrogate must be one of {SURROGATES}, got {surrogate!r}")
        if step_mode not in ("m", "s"):
            raise ValueError(f"LIF step_mode must be 'm' or 's', got {step_mode!r}")
        self.tau = float(tau)
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.decay_input = bool(decay_input)
        self.detach_reset = bool(detach_reset)
        self.alpha = float(alpha)
        self.surrogate = surrogate
        self.step_mode = step_mode
        self.period = None if period is None else int(period)
        self.v: torch.Tensor | None = None  # single-step state only
        self._steps = 0

    def extra_repr(self) -> str:
        reset = "soft" if self.v_reset is None else f"hard, v_reset={self.v_reset}"
        extra = "" if self.surrogate == "sigmoid" else f", surrogate={self.surrogate}"
        if self.step_mode == "s":
            extra += ", step_mode=s" + (f", period={self.period}" if self.period else "")
        return (f"tau={self.tau}, v_threshold={self.v_threshold}, {reset}, decay_input={self.decay_input}, "
                f"detach_reset={self.detach_reset}, alpha={self.alpha}{extra}")

    def reset(self) -> None:
        """Forget the single-step state (multi-step mode keeps none); spikingjelly's reset_net calls this."""
        self.v = None
        self._steps = 0

    def charge(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        base = 0.0 if self.v_reset is None else self.v_reset
        if self.decay_input:
            return v + (x - (v - base)) / self.tau
        return v - (v - base) / self.tau + x

    def fire(self, h: torch.Tensor) -> torch.Tensor:
        return heaviside_spike(h - self.v_threshold, self.alpha, getattr(self, "surrogate", "sigmoid"))

    def reset_membrane(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s_r = s.detach() if self.detach_reset else s
        if self.v_reset is None:
            return h - self.v_threshold * s_r
        return h * mark_spikes(1.0 - s_r) + self.v_reset * s_r  # 1 - s is binary too: saved as bits

    def initial_membrane(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x)
        if self.v_reset is not None and self.v_reset != 0.0:
            v = v + self.v_reset
        return v

    def kernel_params(self) -> tuple | None:
        """This neuron's parameters for the fused kernel (nn/lif_kernel.py), or None when the kernel would not
        compute exactly what charge/fire/reset_membrane compute (a subclass or an instance that changes them)."""
        cls = type(self)
        integrate = isinstance(self, IF)
        if (cls.charge is not (IF.charge if integrate else LIF.charge) or cls.fire is not LIF.fire
                or cls.reset_membrane is not LIF.reset_membrane):
            return None
        if any(k in self.__dict__ for k in ("charge", "fire", "reset_membrane", "forward")):
            return None  # patched for export (bipolar spikes) or taps
        hard = self.v_reset is not None
        return (math.inf if integrate else float(self.tau), float(self.v_threshold),
                float(self.v_reset) if hard else 0.0, hard, bool(self.decay_input), bool(self.detach_reset),
                float(self.alpha), getattr(self, "surrogate", "sigmoid") == "atan", integrate)

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One time step [B, ...] from the kept membrane; starts afresh after reset() or `period` calls."""
        if self.v is None or (self.period and self._steps >= self.period):
            self.v, self._steps = self.initial_membrane(x), 0
        h = self.charge(self.v, x)
        s = self.fire(h)
        self.v = self.reset_membrane(h, s)
        self._steps += 1
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "step_mode", "m") == "s":
            return self.single_step_forward(x)
        if isinstance(x, FakeTensor):  # shape inference (binarize's passes): spikes have the input's shape
            return torch.empty_like(x)
        params = self.kernel_params()
        fused = fused_lif(x, params) if params is not None else None  # one pass over T each way, same spikes
        if fused is not None:
            return neuron_output(fused)
        v = self.initial_membrane(x[0])
        out = []
        for t in range(x.shape[0]):
            h = self.charge(v, x[t])
            s = self.fire(h)
            v = self.reset_membrane(h, s)
            out.append(s)
        return neuron_output(torch.stack(out, 0))


class IF(LIF):
    """Multi-step integrate-and-fire (LIF with tau -> infinity): H = V + X, then fire and reset as LIF."""

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0, detach_reset: bool = True,
                 alpha: float = 4.0, surrogate: str = "sigmoid", step_mode: str = "m",
                 period: int | None = None) -> None:
        super().__init__(tau=math.inf, v_threshold=v_threshold, v_reset=v_reset, decay_input=True,
                         detach_reset=detach_reset, alpha=alpha, surrogate=surrogate, step_mode=step_mode,
                         period=period)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("tau=inf, ", "").replace(", decay_input=True", "")

    def charge(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v + x


class ParametricLIF(LIF):
    """LIF with a learnable time constant (PLIF, Fang et al. 2021): 1/tau = sigmoid(w), w a parameter.

    H = V + (X - (V - V_reset)) * sigmoid(w) (decay_input) or V - (V - V_reset) * sigmoid(w) + X, as
    spikingjelly's ParametricLIFNode computes it; the parameter is named `w` so its checkpoints load.
    """

    def __init__(self, init_tau: float = 2.0, v_threshold: float = 1.0, v_reset: float | None = 0.0,
                 decay_input: bool = True, detach_reset: bool = True, alpha: float = 4.0,
                 surrogate: str = "sigmoid", step_mode: str = "m", period: int | None = None) -> None:
        super().__init__(tau=init_tau, v_threshold=v_threshold, v_reset=v_reset, decay_input=decay_input,
                         detach_reset=detach_reset, alpha=alpha, surrogate=surrogate, step_mode=step_mode,
                         period=period)

    @property
    def tau(self) -> float:
        """The current time constant 1 / sigmoid(w)."""
        with torch.no_grad():
            return float(1.0 / self.w.sigmoid())

    @tau.setter
    def tau(self, value: float) -> None:
        w = -math.log(float(value) - 1.0)
        if "w" in self._parameters:
            with torch.no_grad():
                self.w.fill_(w)
        else:
            self.w = nn.Parameter(torch.as_tensor(w))

    def charge(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        base = 0.0 if self.v_reset is None else self.v_reset
        q = self.w.sigmoid()
        if self.decay_input:
            return v + (x - (v - base)) * q
        return v - (v - base) * q + x
