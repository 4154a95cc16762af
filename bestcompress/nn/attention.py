"""Binary spiking attention: the map neuron and the learnable per-step, per-head scale lambda."""
from __future__ import annotations

import torch
from torch import nn

from .lif import LIF


class AttentionMapNeuron(LIF):
    """LIF on the attention map (Q·Kᵀ or Kᵀ·V): soft reset, V_th = 1, emits a binary {0, 1} map.

    Input is time-first [T, ...]; a map whose leading axis is T·B is viewed as [T, B, ...] first.
    """

    def __init__(self, time_steps: int, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0,
                 time_merged: bool = False) -> None:
        super().__init__(tau=tau, v_threshold=v_threshold, v_reset=None, decay_input=True,
                         detach_reset=True, alpha=alpha)
        self.time_steps = int(time_steps)
        self.time_merged = bool(time_merged)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_merged:
            shape = x.shape
            return super().forward(x.reshape((self.time_steps, -1) + tuple(shape[1:]))).reshape(shape)
        return super().forward(x)


class AttentionScale(nn.Module):
    """Y * lambda with lambda a learnable [T, 1, heads, 1, 1] tensor initialised to 1 (BESTformer).

    Y is the product with the binary map, laid out [T, B, heads, a, b] or [T·B, heads, a, b].
    """

    def __init__(self, time_steps: int, heads: int, time_merged: bool = False) -> None:
        super().__init__()
        self.time_steps = int(time_steps)
        self.heads = int(heads)
        self.time_merged = bool(time_merged)
        self.lam = nn.Parameter(torch.ones(self.time_steps, 1, self.heads, 1, 1))

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}, heads={self.heads}, time_merged={self.time_merged}"

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        shape = y.shape
        y5 = y.reshape((self.time_steps, -1, self.heads) + tuple(shape[-2:]))
        return (y5 * self.lam).reshape(shape)


class StepMapNeuron(AttentionMapNeuron):
    """The map neuron of attention that a model runs once per time step, with its membrane passed explicitly.

    `forward(x, v=None) -> (spikes, v_next)`: one step from membrane `v` (rest when None). A forward unrolled
    over time threads `v` from step to step in its graph, so all steps share one neuron (and its dynamics)
    while nothing is stored between calls: the model stays a function of its input, and exports as it runs.
    """

    def forward(self, x: torch.Tensor, v: torch.Tensor | None = None):
        if v is None:
            v = self.initial_membrane(x)
        h = self.charge(v, x)
        s = self.fire(h)
        return s, self.reset_membrane(h, s)


class StepAttentionScale(AttentionScale):
    """λ for attention that runs one time step per call (the model loops over time), shape [T, 1, heads, 1, 1].

    `forward(y, t)` multiplies by λ[t] (an unrolled graph passes the step); without `t`, call t of every T
    consecutive calls uses λ[t] (an eager time loop), a counter that reset() (and reset_state) restarts at 0.
    """

    bc_stateful = True  # the step counter is state: bestcompress.nn.state.reset_state clears it

    def __init__(self, time_steps: int, heads: int) -> None:
        super().__init__(time_steps, heads, time_merged=False)
        self._steps = 0

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}, heads={self.heads}, per_step=True"

    def reset(self) -> None:
        self._steps = 0

    def forward(self, y: torch.Tensor, t: int | None = None) -> torch.Tensor:
        if t is None:
            t = self._steps % self.time_steps
            self._steps = t + 1
        shape = y.shape
        return (y.reshape((-1, self.heads) + tuple(shape[-2:])) * self.lam[t]).reshape(shape)
