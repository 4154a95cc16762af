"""Fixtures shared by the calibration tests."""
from __future__ import annotations

import pytest
import torch

from bestcompress.data import load_dataset
from bestcompress.training.trainer import train
from bestcompress.zoo import create_model

SEQ = dict(seq_len=20, embed_dims=32, num_heads=2, depths=1, T=2)


@pytest.fixture(scope="session")
def teacher_and_data():
    """A small full-precision spiking transformer trained on seeded synthetic sequences (~60 % top-1)."""
    torch.manual_seed(0)
    model = create_model("spikformer_seq", **SEQ)
    data = load_dataset("synthetic", model, subset=512)
    train(model, data, "bestformer", epochs=8, log=lambda *a: None,
          overrides={"train.batch_size": 32, "train.lr": 5e-3, "train.warmup_epochs": 0, "train.val_fraction": 0.0})
    return model.eval(), data
