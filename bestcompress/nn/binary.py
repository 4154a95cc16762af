"""1-bit weight layers: IR-Net standardize-then-sign as a Brevitas weight quantizer.

W_hat = (W - mean_c(W)) / std_c(W) per output channel c, W_b = sign(W_hat) in {-1, +1} (0 maps to +1),
identity straight-through gradient. Optionally scaled per output channel by alpha_c = mean|W_hat_c|.
The layers subclass Brevitas' QuantConv1d/QuantConv2d/QuantLinear and keep the parameter names
`weight`/`bias`, so full-precision state_dicts load into them unchanged.
"""
from __future__ import annotations

import torch
from brevitas.core.quant import BinaryQuant
from brevitas.core.scaling import ScalingImplType, ScalingPerOutputType
from brevitas.core.stats import StatsOp
from brevitas.nn import QuantConv1d, QuantConv2d, QuantLinear
from brevitas.quant import SignedBinaryWeightPerTensorConst
from torch import nn

from .bf16 import bf16_active, bf16_conv, bf16_linear, plan
from .channels_last import channels_last_input
from .int_forward import int_conv2d

EPS = 1e-8


class SignWeightQuant(SignedBinaryWeightPerTensorConst):
    """sign(W) in {-1, +1}, no scale (the BatchNorm that follows absorbs it); identity STE."""

    scaling_const = 1.0
    tensor_quant = BinaryQuant


class ChannelScaledSignWeightQuant(SignedBinaryWeightPerTensorConst):
    """alpha_c * sign(W) with alpha_c = mean|W_c| per output channel; identity STE."""

    scaling_impl_type = ScalingImplType.STATS
    scaling_stats_op = StatsOp.AVE
    scaling_per_output_type = ScalingPerOutputType.CHANNEL
    tensor_quant = BinaryQuant


WEIGHT_QUANTIZERS = {"sign": SignWeightQuant, "sign_scaled": ChannelScaledSignWeightQuant}


def standardize_per_channel(w: torch.Tensor) -> torch.Tensor:
    """(W - mean_c) / std_c over every axis but the first (the output channels)."""
    flat = w.flatten(1)
    shape = (-1,) + (1,) * (w.dim() - 1)
    mean = flat.mean(1).view(shape)
    std = flat.std(1, unbiased=flat.shape[1] > 1).view(shape)
    return (w - mean) / (std + EPS)


class _BinaryWeightMixin:
    """Standardizes `self.weight` per output channel before Brevitas quantizes it to one bit."""

    binary_scaled: bool = False

    def quant_weight(self, quant_input=None, subtensor_slice_list=None):
        return self.weight_quant(standardize_per_channel(self.weight))

    def _cached_weight(self) -> torch.Tensor | None:
        """The ±1 (or ±α_c) weight when no gradient is needed, recomputed only after `weight` changed.

        Inference then skips the per-channel standardisation and Brevitas' quantizer on every call (the
        standardisation alone was ~30 % of an eval forward). None while training with gradients, while a graph
        is traced or exported (they must record the quantizer), or when quant_weight is patched (export copies).
        """
        w = self.weight
        if ((torch.is_grad_enabled() and w.requires_grad) or "quant_weight" in self.__dict__
                or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
                or type(w.data) is not torch.Tensor):
            return None
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.binary_scaled)
        cache = self.__dict__.get("_bc_weight_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, self.quant_weight().value.detach())
            self.__dict__["_bc_weight_cache"] = cache  # not a buffer: never saved, never moved by .to()
        return cache[1]

    def forward(self, x):
        if isinstance(self, QuantConv2d):
            x = channels_last_input(self, x)  # CPU training, where set (nn/channels_last.py)
        w = self._cached_weight()
        if bf16_active():  # opt-in: the same numbers from bf16 GEMMs where exact (nn/bf16.py)
            wq = w if w is not None else self.quant_weight().value
            how = plan(self, x, wq)
            if how is not None:
                return self._bf16_with(x, wq, how)
        if w is None and isinstance(self, QuantConv2d):  # exact int8 products on spikes (nn/int_forward.py)
            y = int_conv2d(self, x)
            if y is not None:
                return y
        if w is None or type(x) is not torch.Tensor:
            return super().forward(x)
        return self._forward_with(x, w)

    def binary_weight(self) -> torch.Tensor:
        """The weight this layer computes with: exactly two values per output channel."""
        with torch.no_grad():
            return self.quant_weight().value.detach()

    @classmethod
    def from_float(cls, module: nn.Module, scaled: bool = False):
        """A binary copy of a float Conv/Linear with the same weight, bias and hyper-parameters."""
        kwargs = cls._float_kwargs(module)
        quant = ChannelScaledSignWeightQuant if scaled else SignWeightQuant
        new = cls(**kwargs, bias=module.bias is not None, weight_quant=quant, return_quant_tensor=False,
                  device=module.weight.device, dtype=module.weight.dtype)
        new.binary_scaled = scaled
        with torch.no_grad():
            new.weight.copy_(module.weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        new.train(module.training)
        return new


def _conv_kwargs(m: nn.Module) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                padding_mode=m.padding_mode)


class BinaryConv1d(_BinaryWeightMixin, QuantConv1d):
    """Conv1d with 1-bit weights (IR-Net sign of the standardized weight)."""

    _float_kwargs = staticmethod(_conv_kwargs)

    def _forward_with(self, x, w):
        return nn.Conv1d._conv_forward(self, x, w, self.bias)

    def _bf16_with(self, x, w, exact):
        return bf16_conv(self, x, w, self.bias, exact)


class BinaryConv2d(_BinaryWeightMixin, QuantConv2d):
    """Conv2d with 1-bit weights (IR-Net sign of the standardized weight)."""

    _float_kwargs = staticmethod(_conv_kwargs)

    def _forward_with(self, x, w):
        return nn.Conv2d._conv_forward(self, x, w, self.bias)

    def _bf16_with(self, x, w, exact):
        return bf16_conv(self, x, w, self.bias, exact)


class BinaryLinear(_BinaryWeightMixin, QuantLinear):
    """Linear with 1-bit weights (IR-Net sign of the standardized weight)."""

    _float_kwargs = staticmethod(lambda m: dict(in_features=m.in_features, out_features=m.out_features))

    def _forward_with(self, x, w):
        return torch.nn.functional.linear(x, w, self.bias)

    def _bf16_with(self, x, w, exact):
        return bf16_linear(x, w, self.bias, exact)


# Swap rules are data: a new layer type is one row.
BINARY_SWAP_RULES: dict[type, type] = {
    nn.Conv1d: BinaryConv1d,
    nn.Conv2d: BinaryConv2d,
    nn.Linear: BinaryLinear,
}

BINARY_LAYERS = tuple(BINARY_SWAP_RULES.values())


def is_binary_layer(module: nn.Module) -> bool:
    return isinstance(module, BINARY_LAYERS)
