"""Channels-last convolutions for CPU training: the tokenizer's convolutions, BatchNorms, neurons and poolings on
[N, H, W, C] memory.

oneDNN computes CPU convolutions in a channels-last (or blocked) layout; fed NCHW, every forward and backward
reorders its input, output and gradients, and `max_pool2d` on NCHW runs a scalar loop. Measured on a Spikformer
tokenizer layer ([256, 32, 32, 32] → 64 channels, 1 thread): convolution backward 0.45 → 0.25 s, 3×3 max-pool
forward 0.29 → 0.05 s. A BinaryConv2d whose `channels_last` is set (`ChannelsLastConvs`, passes/channels_last.py,
sets it where the model is shown to run and give the same result so) converts its input to channels-last memory
while training on CPU; its output is then channels-last, and BatchNorm2d, the fused LIF (nn/layout.py), max-pool,
elementwise ops and reshapes that PyTorch can do as views keep that layout, so the next convolution reads it without
a copy. Values are the same as NCHW (the integer forward on spikes is exact in either layout; float gradients may
differ in rounding). Evaluation, export and tracing keep NCHW.
"""
from __future__ import annotations

import threading

import torch

from .local_flag import setting

_local = threading.local()


def everywhere():
    """Within the block, flagged layers convert in evaluation too (the pass's probe runs the model so)."""
    return setting(_local, "always", True)


def _off_here(x) -> bool:
    return (type(x) is not torch.Tensor or x.dim() != 4 or x.device.type != "cpu" or not x.dtype.is_floating_point
            or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def channels_last_input(layer, x):
    """`x` in channels-last memory when `layer.channels_last` is set and the layer trains on a CPU 4-d float
    tensor outside tracing/export; else `x` unchanged."""
    if not (getattr(layer, "channels_last", False) and (layer.training or getattr(_local, "always", False))):
        return x
    if _off_here(x):
        return x
    return x.contiguous(memory_format=torch.channels_last)
