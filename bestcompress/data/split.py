"""The validation split: a stratified, seeded part of the training set that picks the best epoch.

The test split is never touched: the validation samples come out of the training samples, so validation and test
never overlap and the model never trains on a validation sample.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import DataError, RecipeError
from .datasets import SPLIT_SEED, stratified_split


def validation_split(data, fraction: float, seed: int = 0):
    """A copy of `data` whose training set gives up `fraction` of its samples (stratified by class) to `val`.

    Args:
        data: a DataBundle. One that already has a validation set is returned as it is.
        fraction: 0 <= fraction < 1; 0 returns `data` unchanged (no validation set).
        seed: seed of the split (the same seed gives the same split, so a resumed run validates on the same samples).
    Returns:
        The DataBundle with `val` set; `train_indices` / `val_indices` say which original training samples went
        where.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise RecipeError(f"train.val_fraction must be a number from 0 (no validation) up to but not including 1, "
                          f"got {fraction!r}.")
    if fraction == 0 or data.val is not None:
        return data
    x, y = data.train.tensors
    n = len(y)
    n_val = max(1, int(round(fraction * n)))
    if n - n_val < 1:
        raise DataError(f"'{data.name}' has {n} training sample(s): too few to hold out a validation set "
                        "(set train.val_fraction=0).")
    train_idx, val_idx = stratified_split(y.numpy().astype(np.int64), test_size=n_val, seed=SPLIT_SEED + seed)
    tr, va = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return dataclasses.replace(data, train=TensorDataset(x[tr], y[tr]), val=TensorDataset(x[va], y[va]),
                               train_indices=tr, val_indices=va)
