"""convert.binarize: a model that takes event frames [B, T, C, H, W] (as the CIFAR10-DVS models do: permute to
[T, B, ...]) while its attributes tell only C, H, W gets its input shape inferred as T,C,H,W from the T it declares,
with a note; a model that refuses both shapes keeps the error that says to pass --input-shape."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bestcompress as bc
from bestcompress.errors import ModelError
from bestcompress.passes.base import PassError


class FramesNet(nn.Module):
    def __init__(self, T: int = 3, img_size_h: int = 16, img_size_w: int = 16, in_channels: int = 2) -> None:
        super().__init__()
        self.T, self.img_size_h, self.img_size_w, self.in_channels = T, img_size_h, img_size_w, in_channels
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = x.permute(1, 0, 2, 3, 4)  # [T, B, 2, H, W]
        T, B = x.shape[:2]
        y = self.conv2(torch.relu(self.conv(x.flatten(0, 1))))
        return self.head(y.reshape(T, B, 8, -1).mean((0, 3)))


def test_event_frames_are_inferred_from_the_declared_time_steps():
    torch.manual_seed(0)
    model = FramesNet()
    out = bc.binarize(model, recipe="identity", overrides={"weights": {"binarize": True}})
    assert out.model.bc_input_shape == (3, 2, 16, 16)
    assert any(n.startswith("input shape: 3,2,16,16 (event frames") for n in out.notes)
    x = torch.rand(2, 3, 2, 16, 16)
    assert out.model(x).shape == (2, 4)
    with pytest.raises(RuntimeError):
        model(torch.rand(2, 2, 16, 16))  # what the inferred shape alone would have given


def test_a_model_refusing_both_shapes_keeps_the_error_naming_input_shape():
    model = FramesNet()
    model.forward = lambda x: (_ for _ in ()).throw(ValueError("never"))  # noqa: E731
    with pytest.raises((PassError, ModelError), match="--input-shape"):
        bc.binarize(model, recipe="identity", overrides={"weights": {"binarize": True}})
