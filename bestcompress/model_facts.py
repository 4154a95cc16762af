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
    if shape is None:
        shape = _shape_the_model_tells(model)
    return tuple(int(s) for s in shape) if shape is not None else None


_SIZE_ATTRS = ("img_size", "image_size", "input_size", "img_hw")
_CHANNEL_ATTRS = ("in_channels", "in_chans", "num_channels")
_LENGTH_ATTRS = ("seq_len", "sequence_length", "seq_length")


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))), None)


def _int_attr(objs, names) -> int | None:
    for obj in objs:
        for name in names:
            v = getattr(obj, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _image_size(objs) -> tuple[int, int] | None:
    for obj in objs:
        h, w = getattr(obj, "img_size_h", None), getattr(obj, "img_size_w", None)
        if isinstance(h, int) and isinstance(w, int):
            return h, w
        for name in _SIZE_ATTRS:
            v = getattr(obj, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v, v
            if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
                return tuple(v)
    return None


def _shape_the_model_tells(model: nn.Module) -> tuple[int, ...] | None:
    """The input shape a model states: a timm-style `default_cfg`/`pretrained_cfg` input_size, or image-size and
    channel attributes (on the model or a direct child such as `patch_embed`; channels default to the first
    conv's in_channels), or a sequence length beside a first Conv1d."""
    for attr in ("default_cfg", "pretrained_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if isinstance(size, (tuple, list)) and size and all(isinstance(i, int) for i in size):
            return tuple(size)
    layers = (nn.Conv1d, nn.Conv2d, nn.Linear)
    objs = [model] + [c for _, c in model.named_children() if not isinstance(c, layers)]
    first = _first_layer(model)
    layer = first[1] if first else None
    channels = _int_attr(objs[:1], _CHANNEL_ATTRS) or getattr(layer, "in_channels", None) \
        or _int_attr(objs[1:], _CHANNEL_ATTRS)
    if isinstance(layer, nn.Conv1d):
        length = _int_attr(objs, _LENGTH_ATTRS)
        return (channels, length) if channels and length else None
    hw = _image_size(objs)
    return (channels,) + tuple(hw) if channels and hw else None


def input_shape_hint(model: nn.Module) -> str:
    """What to pass when the input shape is unknown, said from the model's first layer (2-D, 1-D or tokens)."""
    first = _first_layer(model)
    if first is None:
        return "pass the per-sample input shape (CLI: --input-shape, e.g. 3,32,32)"
    name, layer = first
    if isinstance(layer, nn.Conv2d):
        return (f"pass --input-shape C,H,W (its first layer '{name}' is a Conv2d with {layer.in_channels} input "
                f"channels, e.g. {layer.in_channels},32,32)")
    if isinstance(layer, nn.Conv1d):
        return (f"pass --input-shape C,L (its first layer '{name}' is a Conv1d with {layer.in_channels} input "
                f"channels, e.g. {layer.in_channels},40 for a sequence of 40 steps)")
    return (f"pass --input-shape N,F or F (its first layer '{name}' is a Linear with {layer.in_features} input "
            f"features, e.g. 16,{layer.in_features} for 16 tokens)")


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
