"""BatchNorm recalibration: re-estimate the running statistics of a (binary) network on a few batches.

Binarizing the weights changes the scale and offset of every convolution's output, so the BatchNorm statistics
learnt for the full-precision weights no longer fit and most neurons stop firing (or fire everywhere): the binary
model is near chance before training. `recalibrate_batchnorm` re-estimates them on real inputs, which makes the
binary model usable at once. `make_it_fire` uses the same mechanism on random inputs, for checks on freshly
initialised networks.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor],
                          reset: Callable[[], None] | None = None) -> int:
    """Replace every BatchNorm's running mean and variance by their average over `batches`.

    Everything but the BatchNorm layers runs in eval mode (no dropout, dual heads averaged); the BatchNorms
    normalise with batch statistics and accumulate a cumulative average (momentum None, restored afterwards).
    No gradient is computed and no weight changes: only the running statistics and batch counters.

    Args:
        model: the model, calibrated in place; left in eval mode.
        batches: model inputs (already encoded and on the model's device).
        reset: clears stateful neurons between batches (third-party neurons keep their membrane between calls).
    Returns:
        The number of samples seen (0 when `batches` was empty: the statistics are then left as they were).
    """
    bns = batchnorms(model)
    model.eval()
    if not bns:
        return 0
    saved = [(bn.momentum, bn.running_mean.clone() if bn.running_mean is not None else None,
              bn.running_var.clone() if bn.running_var is not None else None,
              bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    seen = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                seen += int(x.shape[0])
                if reset is not None:
                    reset()
    finally:
        for bn, (momentum, mean, var, count) in zip(bns, saved):
            bn.momentum = momentum
            if seen == 0 and mean is not None:  # nothing seen: keep the old statistics
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
        model.eval()
    return seen


def make_it_fire(model: nn.Module, input_shape, batches: int = 1) -> nn.Module:
    """Make a freshly initialised network fire: every BatchNorm gets weight 2 and bias 0.5 and statistics
    re-estimated on seeded random inputs, so that roughly a fifth of the neurons fire (a freshly initialised
    network is silent, which makes checks on its spikes vacuous).

    Args:
        model: the model to calibrate in place.
        input_shape: per-sample input shape.
        batches: calibration batches of 8 random samples.
    Returns:
        `model`, in eval mode.
    """
    for bn in batchnorms(model):
        if bn.affine:
            with torch.no_grad():
                bn.weight.fill_(2.0)
                bn.bias.fill_(0.5)
    g = torch.Generator().manual_seed(0)
    recalibrate_batchnorm(model, (torch.rand((8,) + tuple(input_shape), generator=g) for _ in range(batches)))
    return model
