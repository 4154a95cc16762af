"""train.precision: the trainer runs each training step's forward and backward inside binary_bf16() when the
recipe asks for bf16 (CPU), and outside it by default."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bestcompress.data import load_dataset
from bestcompress.nn.bf16 import bf16_active
from bestcompress.training.trainer import train


class Probe(nn.Module):
    """Records, for each training forward and backward, whether binary layers would compute in bf16."""

    def __init__(self):
        super().__init__()
        self.forward_seen, self.backward_seen = [], []

    def forward(self, x):
        if self.training:
            self.forward_seen.append(bf16_active())
            if x.requires_grad:
                x.register_hook(lambda g: self.backward_seen.append(bf16_active()))
        return x


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_steps_run_in_the_recipes_precision(precision):
    data = load_dataset("synthetic", input_shape=(1, 6), num_classes=3, subset=40)
    torch.manual_seed(0)
    probe = Probe()
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 6), probe, nn.Linear(6, 3))
    train(model, data, epochs=1, overrides={"train.batch_size": 16, "train.precision": precision}, progress=False,
          log=lambda *a, **k: None)
    want = precision == "bf16"
    assert probe.forward_seen and set(probe.forward_seen) == {want}
    assert probe.backward_seen and set(probe.backward_seen) == {want}
    assert not bf16_active()
