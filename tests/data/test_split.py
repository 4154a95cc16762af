"""The validation split: carved from the training set (never the test set), stratified, seeded, disjoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bestcompress.data import load_dataset, read_npz, validation_split
from bestcompress.errors import DataError, RecipeError


def _rows(t: torch.Tensor) -> set:
    return {tuple(r.tolist()) for r in t.flatten(1)}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", input_shape=(1, 6), num_classes=4, subset=200)


def test_validation_comes_from_training_and_never_meets_test(data):
    split = validation_split(data, 0.1, seed=3)
    assert len(split.val) == 20 and len(split.train) == 180 and split.test is data.test
    tr, va = split.train_indices, split.val_indices
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(200))
    assert not _rows(split.val.tensors[0]) & _rows(split.test.tensors[0])
    assert not _rows(split.val.tensors[0]) & _rows(split.train.tensors[0])
    counts = torch.bincount(split.val.tensors[1], minlength=4)
    assert counts.tolist() == [5, 5, 5, 5]  # stratified: 50 per class in the training set


def test_seeded(data):
    a, b, c = validation_split(data, 0.1, 0), validation_split(data, 0.1, 0), validation_split(data, 0.1, 1)
    assert torch.equal(a.val_indices, b.val_indices) and not torch.equal(a.val_indices, c.val_indices)


def test_zero_keeps_the_data_and_bad_fractions_are_refused(data):
    assert validation_split(data, 0.0) is data
    for bad in (1.0, -0.1, "x", True):
        with pytest.raises(RecipeError, match="val_fraction"):
            validation_split(data, bad)
    tiny = load_dataset("synthetic", input_shape=(1, 6), num_classes=2, subset=1)
    with pytest.raises(DataError, match="too few"):
        validation_split(tiny, 0.5)


def test_read_npz(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32), y=np.arange(2))
    arrays = read_npz(tmp_path / "d.npz", required=("x", "y"))
    assert sorted(arrays) == ["x", "y"] and arrays["x"].shape == (2, 3)
    with pytest.raises(DataError, match="has no array 'x_test'"):
        read_npz(tmp_path / "d.npz", required=("x_test",))
    with pytest.raises(DataError, match="does not exist"):
        read_npz(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="Cannot read"):
        read_npz(tmp_path / "bad.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match="Cannot read"):
        read_npz(tmp_path / "one.npy")
