"""The snntorch-form leaky neuron: snntorch.Leaky's exact update, in plain torch ops, as a bestcompress module.

snntorch's Leaky is single-step (the model loops over time) and differs from the spikingjelly LIF that
bestcompress.nn.lif.LIF computes: the decay multiplies by beta, the reset is computed from the *previous*
membrane and applied one step late (reset_delay=True), and a spike needs U > threshold (strict). This module
reproduces that order exactly, so a snntorch model keeps its outputs when its neurons are canonicalized,
while inference runs without Python autograd functions (exportable) and training keeps the surrogate.
"""
from __future__ import annotations

import torch
from torch import nn

from .lif import SURROGATES, heaviside_spike

RESET_MECHANISMS = ("subtract", "zero", "none")  # snntorch's reset_dict order (reset_mechanism_val)


def _as_tensor(value) -> torch.Tensor:
    return value.detach().clone() if isinstance(value, torch.Tensor) else torch.as_tensor(value)


class Leaky(nn.Module):
    """Single-step leaky neuron with snntorch.Leaky's dynamics and calling convention.

    Per call (one time step), with R = Heaviside(U_prev - threshold) (no gradient):
        subtract: U = clamp(beta, 0, 1) * U_prev + X - R * threshold
        zero:     U = clamp(beta, 0, 1) * ((1 - R) * U_prev) + X
        none:     U = clamp(beta, 0, 1) * U_prev + X
        S = Heaviside(U - threshold) (fires on U > threshold) * graded_spikes_factor
    and with reset_delay=False the reset of this step's spike is applied at once (as snntorch does).

    `forward(x, mem=None)` returns (spk, mem), or spk alone when init_hidden and not output. A membrane the
    model passes in (`spk, mem = lif(x, mem)`, snntorch's init_hidden=False style) is the model's own state: it
    is returned and not stored, so nothing of a forward survives it. Called without `mem` (init_hidden=True),
    the membrane is kept in the non-persistent buffer `mem` between calls until `reset()`/`reset_mem()`
    (bestcompress.nn.state.reset_state reaches every neuron).
    Parameters and buffers keep snntorch's names (beta, threshold, graded_spikes_factor, reset_mechanism_val)
    so snntorch checkpoints load.
    """

    def __init__(self, beta=0.9, threshold=1.0, reset_mechanism: str = "subtract", reset_delay: bool = True,
                 init_hidden: bool = False, output: bool = False, graded_spikes_factor=1.0,
                 learn_beta: bool = False, learn_threshold: bool = False, learn_graded_spikes_factor: bool = False,
                 surrogate: str = "atan", alpha: float = 2.0) -> None:
        super().__init__()
        if reset_mechanism not in RESET_MECHANISMS:
            raise ValueError(f"reset_mechanism must be one of {RESET_MECHANISMS}, got {reset_mechanism!r}")
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        for name, value, learn in (("beta", beta, learn_beta), ("threshold", threshold, learn_threshold),
                                   ("graded_spikes_factor", graded_spikes_factor, learn_graded_spikes_factor)):
            t = _as_tensor(value)
            if learn:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)
        self.register_buffer("reset_mechanism_val", torch.as_tensor(RESET_MECHANISMS.index(reset_mechanism)))
        self.register_buffer("mem", torch.zeros(0), persistent=False)
        self.reset_mechanism = reset_mechanism
        self.reset_delay = bool(reset_delay)
        self.init_hidden = bool(init_hidden)
        self.output = bool(output)
        self.surrogate = surrogate
        self.alpha = float(alpha)
        self.step_mode = "s"

    def extra_repr(self) -> str:
        beta = self.beta.tolist() if self.beta.numel() == 1 else f"tensor{tuple(self.beta.shape)}"
        thr = self.threshold.tolist() if self.threshold.numel() == 1 else f"tensor{tuple(self.threshold.shape)}"
        return (f"beta={beta}, threshold={thr}, reset_mechanism={self.reset_mechanism}, "
                f"reset_delay={self.reset_delay}, init_hidden={self.init_hidden}, surrogate={self.surrogate}, "
                f"alpha={self.alpha}")

    # state ------------------------------------------------------------------------------------------------
    def reset_mem(self) -> torch.Tensor:
        self.mem = torch.zeros_like(self.mem)
        return self.mem

    def init_leaky(self) -> torch.Tensor:
        return self.reset_mem()

    def reset(self) -> None:
        """Clear the membrane (spikingjelly's functional.reset_net calls this)."""
        self.reset_mem()

    # dynamics ---------------------------------------------------------------------------------------------
    def spike(self, u_shift: torch.Tensor) -> torch.Tensor:
        return heaviside_spike(u_shift, self.alpha, self.surrogate, strict=True)

    def forward(self, input_: torch.Tensor, mem: torch.Tensor | None = None):
        explicit = mem is not None
        if explicit and self.init_hidden:
            raise TypeError("`mem` should not be passed as an argument while `init_hidden=True`")
        prev = mem if explicit else self.mem
        if prev.shape != input_.shape:
            prev = torch.zeros_like(input_)
        reset = self.spike(prev - self.threshold).detach()
        decay = self.beta.clamp(0, 1)
        if self.reset_mechanism == "subtract":
            u = decay * prev + input_ - reset * self.threshold
        elif self.reset_mechanism == "zero":
            u = decay * ((1 - reset) * prev) + input_
        else:
            u = decay * prev + input_
        spk = self.spike(u - self.threshold) * self.graded_spikes_factor
        if not self.reset_delay:
            do_reset = spk / self.graded_spikes_factor - reset
            if self.reset_mechanism == "subtract":
                u = u - do_reset * self.threshold
            elif self.reset_mechanism == "zero":
                u = u - do_reset * u
        if not explicit:  # the state lives in the neuron (init_hidden, or a call without `mem`): keep it
            self.mem = u
        if self.output or not self.init_hidden:
            return spk, u
        return spk
