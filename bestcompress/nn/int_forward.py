"""Exact integer forward of binary convolutions on spikes: the float32 training step's products in int8.

A BinaryConv2d with unscaled ±1 weights and no bias, fed spikes (every element 0.0 or 1.0), sums integers: each
product is 0 or ±1 and every partial sum an integer no larger than in_channels × kernel size, so float32 (which
holds integers exactly up to 2^24) computes the exact sum whatever its order, and so does an int8 × uint8
convolution with int32 accumulation (oneDNN's `onednn::qconv2d_pointwise`, AMX / VNNI on this kind of CPU, about
3× faster than the float32 convolution at the Spikformer tokenizer's sizes). The output is therefore bit for bit
the float32 layer's. Backward is untouched: the same `aten::convolution_backward` on the float32 input and ±1
weight that autograd would call, so gradients are equal bit for bit too (tests).

Where it applies (`int_conv2d`): outside the opt-in bf16 mode (nn/bf16.py has its own), a BinaryConv2d in
training (no cached weight) on a contiguous CPU float32 4-d input (or a channels-last one, nn/channels_last.py:
the output is then channels-last too), zero padding, no bias, unscaled weights whose values are all ±1, no graph
being traced/exported/compiled, and an input that is 0/1 by bits (checked while it is converted to uint8 in one
pass: csrc/spike_u8.cpp, built on first use like the LIF kernel; without a compiler or with
BESTCOMPRESS_INT_FORWARD=off, or where oneDNN's quantized convolution is missing, every call keeps the
float32 path; `disabled()` switches it off within a block). Anything else (the image fed to the first convolution,
a residual sum of spikes) returns None and the layer runs its own float32 forward.
"""
from __future__ import annotations

import threading

import torch

from .extensions import compiled_once
from .layout import as_dense, restore
from .local_flag import setting

_state: dict = {}
_local = threading.local()


def disabled():
    """Within the block, binary convolutions keep their float32 forward (benchmarks compare the two paths)."""
    return setting(_local, "off", True)


def _kernel():
    """The compiled spikes→uint8 converter, or None (no compiler, no oneDNN quantized conv, or switched off)."""
    return compiled_once(_state, "mod", "bestcompress_spike_u8", "spike_u8.cpp", "BESTCOMPRESS_INT_FORWARD",
                         off=("off", "0", "false", "no"), requires=_onednn_qconv)


def _onednn_qconv() -> None:
    """Raises where this torch build has no oneDNN quantized convolution (present in oneDNN-enabled CPU builds)."""
    torch.ops.onednn.qconv_prepack  # noqa: B018
    torch.ops.onednn.qconv2d_pointwise  # noqa: B018


def _int8_conv(xu: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """Σ xu·w as float32 from uint8 spikes and ±1 weights, int32 accumulation: channels-last (oneDNN's own
    layout) for a channels-last xu, else contiguous."""
    c_out = w.shape[0]
    ones = torch.ones(c_out)
    packed = torch.ops.onednn.qconv_prepack(w.to(torch.int8), ones, 1.0, 0, stride, padding, dilation, groups,
                                            tuple(xu.shape))
    y = torch.ops.onednn.qconv2d_pointwise(xu, 1.0, 0, packed, ones, torch.zeros(c_out, dtype=torch.long), None,
                                           stride, padding, dilation, groups, 1.0, 0, torch.float32, "none", [], "")
    if y.is_contiguous() or xu.is_contiguous(memory_format=torch.channels_last):
        return y
    if y.is_contiguous(memory_format=torch.channels_last):
        return _kernel().nhwc_to_nchw(y)
    return y.contiguous()


class _IntForwardConv(torch.autograd.Function):
    """conv2d(x, w) without bias: forward from the uint8 copy of spikes x, backward as autograd's own."""

    @staticmethod
    def forward(ctx, x, w, xu, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, groups)
        return _int8_conv(xu, w.detach(), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_w):
            return None, None, None, None, None, None, None
        gx, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0],
                                                        groups, [need_x, need_w, False])
        return gx, gw, None, None, None, None, None


def _applies(layer, x) -> bool:
    from .bf16 import bf16_active
    return (type(x) is torch.Tensor and x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and x.numel() > 0 and layer.bias is None
            and not getattr(layer, "binary_scaled", False) and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str) and not bf16_active()
            and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()))


def int_conv2d(layer, x: torch.Tensor) -> torch.Tensor | None:
    """`layer(x)` (a BinaryConv2d) computed by the exact integer forward, or None where it does not apply."""
    if getattr(_local, "off", False) or not _applies(layer, x) or _kernel() is None:
        return None
    w = layer.quant_weight().value
    if type(w) is not torch.Tensor or w.dtype != torch.float32 or not bool((w.detach().abs() == 1).all()):
        return None
    xd, order = as_dense(x)  # channels-last spikes are converted in their memory order and stay so
    xu = _kernel().spikes_to_u8(xd)
    if xu.numel() == 0:
        return None
    xu = restore(xu, order)
    return _IntForwardConv.apply(x, w, xu, list(layer.stride), list(layer.padding), list(layer.dilation),
                                   layer.groups)
