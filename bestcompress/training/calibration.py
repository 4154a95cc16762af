"""BatchNorm recalibration on a data set's training samples: what `binarize --calibrate DATA` and the start of
`distill` run (the mechanism is bestcompress.nn.calibrate.recalibrate_batchnorm)."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.calibrate import batchnorms, recalibrate_batchnorm
from .evaluation import neuron_reset_fn, resolve_data


def calibration_batches(data, batches: int, batch_size: int, seed: int = 0, device=None):
    """The first `batches` batches of a seeded permutation of the training set, encoded (a generator)."""
    x_all = data.train.tensors[0]
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed * 100_003 + 17))
    gen = torch.Generator().manual_seed(seed * 100_003 + 19)
    for b in range(batches):
        sel = perm[b * batch_size:(b + 1) * batch_size]
        if len(sel) == 0:
            return
        x = data.encode(x_all[sel], gen)
        yield x.to(device) if device is not None else x


def calibrate(model: nn.Module, data, *, batches: int = 8, batch_size: int = 64, seed: int = 0, device=None,
              encoding: str = "direct", subset: int | None = None) -> tuple[int, int]:
    """Re-estimate the BatchNorm statistics of `model` on `batches` training batches of `data`.

    Args:
        model: the model (in place; left in eval mode, on its device). Weights do not change.
        data: a DataBundle or a data set name/path (fitted to the model).
        batches, batch_size: how much data to use.
        seed: which samples (a seeded permutation of the training set).
        device: where to run (default: where the model is).
        encoding, subset: as for load_dataset, when `data` is a name.
    Returns:
        (samples seen, BatchNorm layers recalibrated).
    """
    data = resolve_data(data, model, encoding, subset, seed)
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    seen = recalibrate_batchnorm(model, calibration_batches(data, batches, batch_size, seed, device),
                                 reset=neuron_reset_fn(model))
    return seen, len(batchnorms(model)) if seen else 0
