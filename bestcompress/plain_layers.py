"""The plain parent of a Conv1d/Conv2d/Linear subclass, and a seeded random input to compare the two on.

Both checks that a subclassed weight layer computes what its parent class computes use these: BinarizeWeights'
subclass check (passes/binarize_weights.py, a layer taking a plain batch) and the multi-step convolution fold
(multistep_layers.py, a layer taking [T, B, ...]).
"""
from __future__ import annotations

import torch
from torch import nn


def plain_layer(module: nn.Module, parent: type) -> nn.Module:
    """A fresh `parent` layer (Conv1d, Conv2d or Linear) configured as `module`, on its device and dtype, in its
    mode; its own parameters are new (the caller copies or shares `module`'s)."""
    if parent is nn.Linear:
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    else:
        plain = parent(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                       padding=module.padding, dilation=module.dilation, groups=module.groups,
                       bias=module.bias is not None, padding_mode=module.padding_mode)
    return plain.to(module.weight.device, module.weight.dtype).train(module.training)


def random_input(module: nn.Module, parent: type, g: torch.Generator, lead: tuple[int, ...] = (2,)) -> torch.Tensor:
    """Seeded random input for `module` with leading dimensions `lead` (a Linear takes [3, in_features]), large
    enough for its kernel, on its device and dtype."""
    if parent is nn.Linear:
        x = torch.randn(3, module.in_features, generator=g)
    else:
        dims = 1 if parent is nn.Conv1d else 2
        size = max(8, *(k * d + 2 for k, d in zip(module.kernel_size, module.dilation)))
        x = torch.randn(lead + (module.in_channels,) + (size,) * dims, generator=g)
    return x.to(module.weight.device, module.weight.dtype)
