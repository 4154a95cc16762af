"""Make a freshly initialised spiking network fire, so that checks on its spikes are not vacuous."""
from __future__ import annotations

import torch
from torch import nn


def make_it_fire(model: nn.Module, input_shape, batches: int = 1) -> nn.Module:
    """Re-estimate every BatchNorm on seeded random inputs with weight 2 and bias 0.5, so that roughly a fifth of
    the neurons fire: a freshly initialised network is silent (no spike anywhere).

    Args:
        model: the model to calibrate in place.
        input_shape: per-sample input shape.
        batches: calibration batches of 8 random samples.
    Returns:
        `model`, in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        with torch.no_grad():
            bn.weight.fill_(2.0)
            bn.bias.fill_(0.5)
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand((8,) + tuple(input_shape), generator=g))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()
