"""A non-finite loss stops training with one sentence that names the epoch and the step, keeping the last good
checkpoint; evaluation says when outputs are not finite instead of giving an accuracy."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bestcompress.data import load_dataset
from bestcompress.errors import ModelError
from bestcompress.training.run_state import read_metrics
from bestcompress.training.trainer import evaluate, train


class Bomb(nn.Module):
    """Returns NaN from its `fuse`-th training call on."""

    def __init__(self, fuse: int):
        super().__init__()
        self.fuse, self.calls = fuse, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls >= self.fuse:
                return x * float("nan")
        return x


@pytest.fixture
def data():
    return load_dataset("synthetic", input_shape=(1, 6), num_classes=3, subset=64)


def test_nan_loss_stops_at_its_epoch_and_step(tmp_path, data):
    steps = -(-(64 - round(0.1 * 64)) // 16)  # 58 training samples in batches of 16: 4 steps
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), Bomb(fuse=steps + 2))  # epoch 2, step 2
    with pytest.raises(ModelError) as e:
        train(model, data, epochs=3, overrides={"train.batch_size": 16}, run_dir=tmp_path / "run",
              out=tmp_path / "fp.pt", log=lambda *a: None)
    msg = str(e.value)
    assert "epoch 2, step 2" in msg and "not finite" in msg and "last.pt" in msg and "(epoch 1)" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")  # one sentence
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert [m["epoch"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]
    assert not (tmp_path / "fp.pt").exists()


def test_nan_in_the_first_epoch_says_nothing_was_kept(data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), Bomb(fuse=1))
    with pytest.raises(ModelError, match="epoch 1, step 1: the loss .* no checkpoint was written"):
        train(model, data, epochs=1, log=lambda *a: None)


def test_evaluate_refuses_non_finite_outputs(data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(ModelError, match=r"not finite \(NaN or Inf\) on \d+ of 16 test samples"):
        evaluate(model, data)
