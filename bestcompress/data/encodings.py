"""Spike encodings: how a static sample becomes the model's input.

- direct: the static tensor itself. The zoo models repeat a static input over the T time steps inside their
  forward ("static" input mode); for a model built with input_mode="events" the frame is repeated T times here.
- poisson: rate coding. Each of the T steps is an independent Bernoulli draw with the pixel value as its
  probability, so the spike rate over time equals the value (values must lie in [0, 1]). The result is
  [B, T, ...] event frames: the model must take event frames (zoo models: `input_mode="events"`).
"""
from __future__ import annotations

import torch

from ..errors import DataError

ENCODINGS = ("direct", "poisson")


class DirectEncoding:
    """Pass the static sample; repeat it over T only when the model takes event frames."""

    name = "direct"

    def __init__(self, time_steps: int | None = None) -> None:
        self.time_steps = time_steps  # set only when the model takes [B, T, ...] frames

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.time_steps is None:
            return x
        return x.unsqueeze(1).expand(x.shape[0], self.time_steps, *x.shape[1:]).contiguous()


class PoissonEncoding:
    """Bernoulli spikes per time step with rate = value: [B, ...] in [0, 1] -> [B, T, ...] in {0, 1}."""

    name = "poisson"

    def __init__(self, time_steps: int) -> None:
        if not isinstance(time_steps, int) or time_steps < 1:
            raise DataError(f"Poisson coding needs a positive number of time steps, got {time_steps!r}.")
        self.time_steps = time_steps

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = (x.shape[0], self.time_steps) + tuple(x.shape[1:])
        # Draw on the CPU with the (CPU) generator so runs are reproducible on any device.
        u = torch.rand(shape, generator=generator, dtype=torch.float32)
        return (u.to(x.device) < x.unsqueeze(1).float()).to(x.dtype)


def make_encoding(name: str, time_steps: int | None = None, events: bool = False):
    """The encoding called `name` ('direct' or 'poisson').

    Args:
        name: 'direct' or 'poisson'.
        time_steps: T, needed when the model takes event frames.
        events: True when the model takes [B, T, ...] event frames rather than static samples.
    """
    if name not in ENCODINGS:
        raise DataError(f"Unknown encoding '{name}'; use one of {', '.join(ENCODINGS)}.")
    if name == "poisson":
        if not events:
            raise DataError("Poisson coding makes [B, T, ...] event frames but the model takes static samples; "
                            "build the model with input_mode='events' (CLI: --model-kwargs input_mode=events).")
        return PoissonEncoding(time_steps)
    return DirectEncoding(time_steps if events else None)
