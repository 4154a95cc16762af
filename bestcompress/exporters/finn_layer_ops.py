"""The per-step layer arithmetic of the FINN-ready graph (finn_unroll.py): a 1-bit layer as its ±1 sign matrix
times α_c plus bias (the product itself integer × binary), and convolutions in the 2-D form FINN lowers."""
from __future__ import annotations

import torch
from torch import nn


def sign_and_scale(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 1-bit layer's weight as (±1 sign matrix, per-channel α_c or None when every α_c is 1)."""
    with torch.no_grad():
        w = module.binary_weight().float()
    alpha = w.abs().flatten(1).amax(1)
    sign = torch.where(w >= 0, 1.0, -1.0)
    return sign, (None if torch.all(alpha == 1.0) else alpha)


def binary_layer(module, weights: tuple, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, accumulator): the sign-matrix product (±1 constant; integer × binary), then α_c and bias."""
    sign, alpha = weights
    acc = torch.matmul(x, sign.t().contiguous()) if isinstance(module, nn.Linear) else conv_2d_form(module, x, sign)
    shape = channel_shape(module, acc.dim())
    y = acc
    if alpha is not None:
        y = y * alpha.view(shape)
    if module.bias is not None:
        y = y + module.bias.detach().view(shape)
    return y, acc


def channel_shape(module, dim: int) -> tuple[int, ...]:
    """How a per-output-channel vector is viewed against the layer's `dim`-d output (last axis for a Linear)."""
    return (-1,) if isinstance(module, nn.Linear) else (-1,) + (1,) * (dim - 2)


def conv_2d_form(module, x, weight, bias=None):
    """The module's convolution with `weight`; a 1-D one as a 2-D one over a height of 1 (FINN lowers only those)."""
    import torch.nn.functional as F
    if weight.dim() == 3:
        y = F.conv2d(x.unsqueeze(2), weight.unsqueeze(2), None, (1,) + tuple(module.stride),
                     (0,) + tuple(module.padding), (1,) + tuple(module.dilation), module.groups).squeeze(2)
    else:
        y = F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    return y if bias is None else y + bias.view((-1,) + (1,) * (y.dim() - 2))


def float_conv(module: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return module(x)
    return conv_2d_form(module, x, module.weight.detach(), None if module.bias is None else module.bias.detach())
