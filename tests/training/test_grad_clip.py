"""Clipping computes the gradient norm without overflow: finite gradients whose squares overflow fp32 (a fresh
spiking network's silent neurons before BatchNorms reach ~1e30) are clipped to a finite step, as torch's
clip_grad_norm_ cannot (it returns Inf and zeroes them); a NaN or Inf gradient still stops training."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bestcompress.data import load_dataset
from bestcompress.errors import ModelError
from bestcompress.training.grad_clip import clip_grad_norm
from bestcompress.training.trainer import train


def _params(*values):
    ps = []
    for v in values:
        p = nn.Parameter(torch.zeros(len(v)))
        p.grad = torch.tensor(v, dtype=torch.float32)
        ps.append(p)
    return ps


def test_small_gradients_clip_as_torch_does():
    torch.manual_seed(0)
    values = (torch.randn(50).tolist(), torch.randn(7).tolist())
    ours, theirs = _params(*values), _params(*values)
    norm = clip_grad_norm(ours, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert torch.allclose(norm.float(), ref_norm, rtol=1e-6) and float(norm) > 1.0
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6)
    assert abs(float(torch.linalg.vector_norm(torch.cat([p.grad for p in ours]))) - 1.0) < 1e-5


def test_finite_gradients_whose_squares_overflow_are_clipped_not_zeroed():
    big = [3e30, -4e30] + [0.0] * 10
    (p,) = _params(big)
    (q,) = _params(big)
    assert not torch.isfinite(torch.nn.utils.clip_grad_norm_([q], 1.0))  # what torch gives
    norm = clip_grad_norm([p], 1.0)
    assert torch.isfinite(norm) and abs(float(norm) / 5e30 - 1.0) < 1e-6
    assert torch.allclose(p.grad[:2], torch.tensor([0.6, -0.8]), atol=1e-5)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_gives_a_non_finite_norm(bad):
    (p,) = _params([1e30, bad, 1.0])
    assert not torch.isfinite(clip_grad_norm([p], 1.0))


class Amplify(torch.autograd.Function):
    """Identity forward; backward multiplies by `gain` (stands in for a chain of BatchNorms on silent inputs)."""

    @staticmethod
    def forward(ctx, x, gain):
        ctx.gain = gain
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.gain, None


class Loud(nn.Module):
    def __init__(self, gain: float):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
        self.gain = gain

    def forward(self, x):
        h = self.body[1](self.body[0](x))
        return self.body[3](Amplify.apply(self.body[2](h), self.gain))


@pytest.fixture
def data():
    return load_dataset("synthetic", input_shape=(1, 6), num_classes=3, subset=32)


def test_a_step_with_huge_finite_gradients_trains(data):
    torch.manual_seed(0)
    model = Loud(1e28)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, data, epochs=1, overrides={"train.batch_size": 16}, log=lambda *a: None)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert not torch.equal(before[0], after[0].detach())  # the amplified layer moved: not zeroed by the clip


def test_an_infinite_gradient_still_stops_with_one_sentence(data):
    model = Loud(float("inf"))
    with pytest.raises(ModelError, match=r"epoch 1, step 1: the gradient norm is not finite"):
        train(model, data, epochs=1, overrides={"train.batch_size": 16}, log=lambda *a: None)
