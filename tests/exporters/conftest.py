"""Shared fixtures for the export tests: tiny binary models, built once per session (seeded)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.nn.calibrate import make_it_fire
from bestcompress.nn.lif import LIF
from bestcompress.zoo import create_model, get_entry, list_models

FAMILIES = list_models()


class TinySpikingMLP(nn.Module):
    """[B, F] repeated over T -> fc0 (kept fp) -> LIF -> fc1 (binary) -> BN -> LIF -> mean over T -> head."""

    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 4, T: int = 2) -> None:
        super().__init__()
        self.T = T
        self.fc0 = nn.Linear(features, hidden)
        self.lif0 = LIF()
        self.fc1 = nn.Linear(hidden, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.lif1 = LIF()
        self.head = nn.Linear(hidden, classes)
        self.bc_input_shape = (features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(0).repeat(self.T, 1, 1)
        T, B, F = x.shape
        s = self.lif0(self.fc0(x.flatten(0, 1)).reshape(T, B, -1) * 4.0)
        s = self.lif1(self.bn1(self.fc1(s.flatten(0, 1))).reshape(T, B, -1))
        return self.head(s.mean(0))


class TinySpikingConv(nn.Module):
    """The SPS tokenizer's shape in small: conv0 (kept fp) -> BN -> LIF -> conv1 (binary) -> BN -> LIF -> MaxPool
    -> conv2 (binary) -> BN -> LIF -> mean over pixels and T -> head; T = 2, 3x8x8 input."""

    def __init__(self, T: int = 2) -> None:
        super().__init__()
        self.T = T
        self.conv0, self.bn0, self.lif0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), LIF()
        self.conv1, self.bn1, self.lif1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), LIF()
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2, self.lif2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), LIF()
        self.head = nn.Linear(16, 4)
        self.bc_input_shape = (3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        T, B = x.shape[:2]
        s = self.lif0(self.bn0(self.conv0(x.flatten(0, 1))).reshape(T, B, 8, 8, 8))
        s = self.lif1(self.bn1(self.conv1(s.flatten(0, 1))).reshape(T, B, 8, 8, 8))
        s = self.pool(s.flatten(0, 1))
        s = self.lif2(self.bn2(self.conv2(s)).reshape(T, B, 16, 4, 4))
        return self.head(s.flatten(3).mean(3).mean(0))


def tiny_binary(name: str, **overrides):
    """binarize(zoo tiny model) with the BESTformer recipe (reversible couplings on unless overridden), with
    BatchNorms calibrated so that the neurons fire."""
    torch.manual_seed(0)
    model = create_model(name, **get_entry(name).tiny_cfg).eval()
    binary = binarize(model, "bestformer", overrides=overrides or None).model
    return make_it_fire(binary, binary.bc_input_shape, batches=2), model


_cache: dict = {}


@pytest.fixture(scope="session")
def binary_models():
    """name -> (binary model, fp source) for every zoo family, built lazily."""
    def get(name: str, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in _cache:
            _cache[key] = tiny_binary(name, **overrides)
        return _cache[key]
    return get


@pytest.fixture(scope="session")
def tiny_mlp_binary():
    torch.manual_seed(0)
    binary = binarize(TinySpikingMLP().eval(), "bestformer", overrides={"reversible.enabled": False}).model
    return make_it_fire(binary, binary.bc_input_shape, batches=2)


@pytest.fixture(scope="session")
def tiny_conv_binary():
    torch.manual_seed(0)
    binary = binarize(TinySpikingConv().eval(), "bestformer", overrides={"reversible.enabled": False}).model
    return make_it_fire(binary, binary.bc_input_shape, batches=2)
