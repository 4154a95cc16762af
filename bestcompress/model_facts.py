"""Facts about a model that every layer may read: its per-sample input shape, its time steps, an example input.

A leaf module (imports only torch and, lazily, the zoo registry): data loading, summaries, checkpoints and
exporters ask here instead of importing the binarizer.
"""
from __future__ import annotations

import torch
from torch import nn


def model_time_steps(model: nn.Module) -> int | None:
    """The number of time steps T the model declares (attribute T, time_steps, timesteps or num_steps)."""
    for attr in ("T", "time_steps", "timesteps", "num_steps"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """Per-sample input shape (no batch axis) the model declares, or that its zoo entry gives."""
    shape = getattr(model, "bc_input_shape", None) or getattr(model, "input_shape", None)
    if shape is None:
        spec = getattr(model, "bc_spec", None)
        if spec and spec.get("arch"):
            from .zoo import get_entry
            entry = get_entry(spec["arch"])
            cfg = {**entry.default_cfg, **spec.get("kwargs", {})}
            shape = entry.input_shape(cfg)
    return tuple(int(s) for s in shape) if shape is not None else None


def example_input_for(model: nn.Module, input_shape=None, batch: int = 2, seed: int = 0) -> torch.Tensor | None:
    """A seeded random batch for shape propagation and checks (None when the shape is unknown)."""
    shape = tuple(input_shape) if input_shape else model_input_shape(model)
    if shape is None:
        return None
    g = torch.Generator().manual_seed(seed)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return torch.rand((batch,) + shape, generator=g).to(device)
