"""Pieces shared by the zoo models: the neuron, time handling, option checks and checkpoint-key helpers.

Forward helpers here are written for torch.fx: shapes are unpacked into names (never len()/ndim/loops on
tensor sizes), so a tracer that keeps LIF as a leaf traces every model end to end.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bestcompress.errors import ModelError
from bestcompress.nn.lif import LIF

INPUT_MODES = ("static", "events")


def lif(v_threshold: float = 1.0) -> LIF:
    """The public models' neuron: spikingjelly MultiStepLIFNode(tau=2, detach_reset=True), hard reset to 0."""
    return LIF(tau=2.0, v_threshold=v_threshold, v_reset=0.0, decay_input=True, detach_reset=True)


class UnusedParameters(nn.Module):
    """Parameters that a public model creates but never uses in forward (e.g. LayerNorms norm1/norm2 of the
    Spikformer Block, SDT's talking_heads Conv1d).

    They exist only so that public checkpoints load with strict=True. This module is never called, so it never
    appears in a traced graph, and it holds no LayerNorm/Conv that a module-walking pass could mistake for a
    live layer. requires_grad is False: optimizers and DDP skip them.
    """

    def __init__(self, **shapes: tuple[int, ...]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            init = torch.zeros(shape) if name == "bias" else torch.ones(shape)
            self.register_parameter(name, nn.Parameter(init, requires_grad=False))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters(recurse=False))


# ---------------------------------------------------------------------------------------------- forward helpers

def time_first_image(x: torch.Tensor, T: int, input_mode: str) -> torch.Tensor:
    """[B, C, H, W] repeated T times, or [B, T, C, H, W] event frames, to [T, B, C, H, W]."""
    if input_mode == "events":
        return x.transpose(0, 1).contiguous()
    return x.unsqueeze(0).repeat(T, 1, 1, 1, 1)


def time_first_sequence(x: torch.Tensor, T: int, input_mode: str) -> torch.Tensor:
    """[B, C, L] repeated T times, or [B, T, C, L] event frames, to [T, B, C, L]."""
    if input_mode == "events":
        return x.transpose(0, 1).contiguous()
    return x.unsqueeze(0).repeat(T, 1, 1, 1)


def split_tb4(y: torch.Tensor, T, B) -> torch.Tensor:
    """[T*B, C, H, W] -> [T, B, C, H, W]."""
    _, C, H, W = y.shape
    return y.reshape(T, B, C, H, W)


def split_tb3(y: torch.Tensor, T, B) -> torch.Tensor:
    """[T*B, X, Y] -> [T, B, X, Y]."""
    _, X, Y = y.shape
    return y.reshape(T, B, X, Y)


def split_heads(s: torch.Tensor, T, B, num_heads: int, head_dim: int) -> torch.Tensor:
    """Channel-major [T, B, C, N] -> per-head token-major [T, B, heads, N, head_dim]."""
    return s.transpose(-1, -2).reshape(T, B, -1, num_heads, head_dim).permute(0, 1, 3, 2, 4)


def init_linear_trunc_normal(m: nn.Module) -> None:
    """The public Spikformer init: Linear weights ~ trunc_normal(std 0.02), Linear biases zero."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------- option checks

def check_int(arch: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelError(f"Model '{arch}' needs {name} to be an integer >= {minimum}, got {value!r}.")
    return value


def check_positive_number(arch: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ModelError(f"Model '{arch}' needs {name} to be a positive number, got {value!r}.")
    return value


def check_input_mode(arch: str, input_mode) -> str:
    if input_mode not in INPUT_MODES:
        raise ModelError(f"Model '{arch}' needs input_mode to be one of {', '.join(INPUT_MODES)}, got {input_mode!r}.")
    return input_mode


def check_transformer_dims(arch: str, embed_dims, num_heads, mlp_ratios, depths, T, num_classes, in_channels,
                           dims_multiple: int = 8) -> int:
    """Checks the options every zoo model shares; returns the MLP hidden width."""
    check_int(arch, "embed_dims", embed_dims)
    check_int(arch, "num_heads", num_heads)
    check_int(arch, "depths", depths)
    check_int(arch, "T", T)
    check_int(arch, "num_classes", num_classes)
    check_int(arch, "in_channels", in_channels)
    check_positive_number(arch, "mlp_ratios", mlp_ratios)
    if embed_dims % num_heads:
        raise ModelError(f"Model '{arch}' needs embed_dims ({embed_dims}) divisible by num_heads ({num_heads}).")
    if embed_dims % dims_multiple:
        raise ModelError(f"Model '{arch}' needs embed_dims ({embed_dims}) divisible by {dims_multiple} "
                         f"(its tokenizer widths are embed_dims/{dims_multiple}, ...).")
    return int(embed_dims * mlp_ratios)


def check_image_size(arch: str, img_size, downsample: int) -> int:
    check_int(arch, "img_size", img_size)
    if img_size % downsample:
        raise ModelError(f"Model '{arch}' downsamples by {downsample}, so img_size must be a multiple of "
                         f"{downsample}, got {img_size}.")
    return img_size


def check_patch_size(arch: str, patch_size, downsample: int) -> int:
    """patch_size is informational in the public code (the max-pools fix the downsampling); accept only the
    value that matches, so a config never silently means something else."""
    if patch_size != downsample:
        raise ModelError(f"Model '{arch}' has a fixed patch size of {downsample} (set by its max-pools), "
                         f"got {patch_size!r}.")
    return patch_size


def image_input_shape(cfg: Mapping) -> tuple[int, ...]:
    """Per-sample input shape: (C, H, W), or (T, C, H, W) for event frames."""
    shape = (cfg["in_channels"], cfg["img_size"], cfg["img_size"])
    return (cfg["T"],) + shape if cfg.get("input_mode", "static") == "events" else shape


def sequence_input_shape(cfg: Mapping) -> tuple[int, ...]:
    """Per-sample input shape: (C, L), or (T, C, L) for event frames."""
    shape = (cfg["in_channels"], cfg["seq_len"])
    return (cfg["T"],) + shape if cfg.get("input_mode", "static") == "events" else shape


# ------------------------------------------------------------------------------------ checkpoint-key helpers

def shape_of(state_dict: Mapping, key: str) -> tuple[int, ...] | None:
    """The shape of state_dict[key], or None when the key is missing or not a tensor."""
    value = state_dict.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def count_blocks(state_dict: Mapping, prefix: str = "block.") -> int:
    """Number of blocks as 1 + the largest index i of keys 'prefix{i}.…' (0 when there are none)."""
    indices = set()
    for key in state_dict:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    return max(indices) + 1 if indices else 0


def infer_sizes(state_dict: Mapping, *, first_conv: str, width: str, mlp_in: str, markers: tuple[str, ...] = (),
                default_heads: int = 8) -> dict | None:
    """Options readable from a Spikformer-style state_dict, or None when a needed key is missing.

    Args:
        first_conv: key of the first conv weight (dim 1 = in_channels).
        width: key of a weight whose dim 0 is embed_dims.
        mlp_in: key of the first MLP weight (dim 0 = hidden width).
        markers: further keys that must exist (they tell the families apart).
        default_heads: heads to assume (heads leave no trace in shapes), see guess_heads.
    """
    first, dim, hidden, head = (shape_of(state_dict, k) for k in (first_conv, width, mlp_in, "head.weight"))
    if None in (first, dim, hidden, head) or any(shape_of(state_dict, k) is None for k in markers):
        return None
    d = dim[0]
    return {"embed_dims": d, "depths": count_blocks(state_dict), "num_heads": guess_heads(d, default_heads),
            "mlp_ratios": mlp_ratio_from(hidden[0], d), "num_classes": head[0], "in_channels": first[1]}


def guess_heads(embed_dims: int, default: int = 8) -> int:
    """Heads leave no trace in parameter shapes: keep the default when it divides embed_dims, else the largest
    divisor of embed_dims below it."""
    for h in range(min(default, embed_dims), 0, -1):
        if embed_dims % h == 0:
            return h
    return 1


def mlp_ratio_from(hidden: int, embed_dims: int) -> int | float:
    ratio = hidden / embed_dims
    return int(ratio) if ratio == int(ratio) else ratio
