"""Binary layers on bf16 products where that is exact (opt-in: recipe `train.precision: bf16`, or `binary_bf16()`).

A binary layer multiplies spikes (0 or 1) by ±1 weights: every product is 0 or ±1 and every partial sum an integer
no larger in magnitude than the number of inputs, so bf16 operands with fp32 accumulation (oneDNN's AMX-BF16 /
AVX512-BF16 kernels on this kind of CPU) give the exact sum, as float32 does. Linear layers run as float32 matmuls
in oneDNN's bf16 fpmath mode (bf16 products, float32 accumulation and output). Convolutions run on bf16
channels-last operands, whose output torch rounds to bf16: an integer stays exact while |y| <= 256, so a layer
adding at most 256 inputs (in_channels/groups × kernel size) is exact by construction, a larger one checks
max|y| <= 255 and recomputes that call in float32 when it is not. Without a bias the forward output is therefore
bit for bit the float32 layer's; with one it is the exact sum plus the bias rounded once, where float32 (which
accumulates onto the bias) can be an ulp or two away (tests).

Backward is not exact: the incoming gradient is rounded to bf16 (8 significant bits), so the input and weight
gradients carry a relative error of about 2^-8 per element (products are exact, sums are fp32); the bias gradient
is summed in float32. This is what bf16 mixed precision does for every layer; here it touches only the binary
layers' GEMMs of backward.

Where it applies (`plan`): inside `binary_bf16()`, a BinaryLinear / BinaryConv1d / BinaryConv2d with unscaled ±1
weights, zero padding, a CPU float32 input, no graph being traced or exported. An input whose values are all 0 or
1 (known without a look when it views a bestcompress neuron's output, nn/memory.py's marks, which `binary_bf16`
turns on; otherwise checked by value, a strided sample first) gets the bf16 forward; any other input (a real-valued
residual stream) keeps the float32 forward and, when a gradient is wanted, the bf16 backward. Scaled weights and
everything else run the layer's float32 path unchanged.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from .memory import is_marked, spike_marks

_local = threading.local()
BF16 = torch.bfloat16
EXACT_SUM = 256  # integers up to 2^8 are exact in bf16 (8 significant bits)
_ONE = 0x3F800000  # float32 1.0 as bits
_STRIDE = 61  # the value check looks at every 61st element first (a prime: no alignment with channels)


def bf16_active() -> bool:
    return getattr(_local, "on", False)


@contextmanager
def binary_bf16(enabled: bool = True):
    """Within the block, binary layers compute in bf16 where it is exact (module docstring); nests."""
    outer = bf16_active()
    _local.on = bool(enabled) or outer
    try:
        if enabled and not outer:
            with spike_marks():
                yield
        else:
            yield
    finally:
        _local.on = outer


def bf16_supported() -> bool:
    """True when this CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 is the faster path."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _binary_valued(x: torch.Tensor) -> bool:
    """True when every element of float32 x is +0.0 or 1.0 (by bits: -0.0 and values that merely round to 0 or 1
    in bf16 are refused)."""
    if is_marked(x):
        return True
    bits = x.view(torch.int32)
    if x.is_contiguous():
        sample = bits.reshape(-1)[::_STRIDE]
    else:
        sample = bits
        while sample.dim() > 1 and sample.numel() > bits.numel() // 8:
            sample = sample[0]
    if bool(((sample != 0) & (sample != _ONE)).any()):
        return False  # another stream (real or integer-valued) is refused from a sample (a view) first
    return not bool(((bits != 0) & (bits != _ONE)).any())


def _unit_weight(w: torch.Tensor) -> bool:
    return bool((w.abs() == 1).all())


def plan(layer, x, w) -> bool | None:
    """How `layer` (a binary layer) computes `x` with weight `w` here: True (forward and backward on bf16
    products: x is 0/1, the forward is exact), False (float32 forward, bf16 backward: x is real-valued and a
    gradient is wanted) or None (the layer's own float32 path)."""
    if not bf16_active() or type(x) is not torch.Tensor or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return None
    if getattr(layer, "binary_scaled", False) or type(w) is not torch.Tensor or w.dtype != torch.float32:
        return None
    if hasattr(layer, "padding_mode") and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        return None
    if x.numel() == 0 or not _unit_weight(w.detach()):
        return None
    if _binary_valued(x):
        return True
    return False if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad) else None


def _to_bf16(t: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if t.dim() == 4 else torch.contiguous_format
    return t.to(BF16, memory_format=fmt)


def _fits(y: torch.Tensor, k: int) -> bool:
    """True when bf16 output y holds exact integer sums of k terms of magnitude <= 1 (module docstring)."""
    return k <= EXACT_SUM or float(y.abs().amax()) <= EXACT_SUM - 1


@contextmanager
def _fpmath_bf16():
    """oneDNN's float32 matmuls with bf16 products and float32 accumulation and output (fpmath mode)."""
    knob = torch.backends.mkldnn.matmul
    outer = knob.fp32_precision
    knob.fp32_precision = "bf16"
    try:
        yield
    finally:
        knob.fp32_precision = outer


class _Bf16Linear(torch.autograd.Function):
    """Linear on [M, K]: forward in bf16 products when `exact` (float32 otherwise), backward in bf16 products;
    float32 inputs, accumulation and outputs throughout (oneDNN fpmath mode)."""

    @staticmethod
    def forward(ctx, x2, w, bias, exact):
        if exact:
            with _fpmath_bf16():
                y = torch.nn.functional.linear(x2, w, bias)
        else:
            y = torch.nn.functional.linear(x2, w, bias)
        ctx.save_for_backward(x2, w)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x2, w = ctx.saved_tensors
        with _fpmath_bf16():
            gx = torch.mm(g, w) if ctx.needs_input_grad[0] else None
            gw = torch.mm(g.t(), x2) if ctx.needs_input_grad[1] else None
        gbias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gbias, None


class _Bf16Conv(torch.autograd.Function):
    """Zero-padded convolution: forward on bf16 operands (channels-last) when `exact`, float32 otherwise; backward
    on bf16 operands; results returned as contiguous float32."""

    @staticmethod
    def forward(ctx, x, w, bias, stride, padding, dilation, groups, exact):
        zeros = [0] * (x.dim() - 2)
        y = None
        if exact:
            xb, wb = _to_bf16(x), _to_bf16(w)
            yb = torch.ops.aten.convolution(xb, wb, None, stride, padding, dilation, False, zeros, groups)
            if _fits(yb, w[0].numel()):
                y = yb.to(torch.float32, memory_format=torch.contiguous_format)
            ctx.save_for_backward(xb, wb)
        else:
            ctx.save_for_backward(x, w)
        if y is None:
            y = torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False, zeros, groups)
        if bias is not None:
            y.add_(bias.view((1, -1) + (1,) * (y.dim() - 2)))
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        xb, wb = (t if t.dtype == BF16 else _to_bf16(t) for t in ctx.saved_tensors)
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gw = None
        if need_x or need_w:
            gb = _to_bf16(g)
            zeros = [0] * (g.dim() - 2)
            gx, gw, _ = torch.ops.aten.convolution_backward(gb, xb, wb, None, stride, padding, dilation, False,
                                                            zeros, groups, [need_x, need_w, False])
            gx = gx.to(torch.float32, memory_format=torch.contiguous_format) if need_x else None
            gw = gw.to(torch.float32, memory_format=torch.contiguous_format) if need_w else None
        dims = [0] + list(range(2, g.dim()))
        gbias = g.sum(dims) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gbias, None, None, None, None, None


def bf16_linear(x: torch.Tensor, w: torch.Tensor, bias, exact: bool) -> torch.Tensor:
    """F.linear(x, w, bias) with bf16 products (`plan` says where; module docstring)."""
    shape = x.shape
    y = _Bf16Linear.apply(x.reshape(-1, shape[-1]), w, bias, exact)
    return y.view(*shape[:-1], w.shape[0])


def bf16_conv(layer, x: torch.Tensor, w: torch.Tensor, bias, exact: bool) -> torch.Tensor:
    """layer's zero-padded convolution of x with w, with bf16 products (`plan` says where; module docstring)."""
    return _Bf16Conv.apply(x, w, bias, list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups,
                           exact)


