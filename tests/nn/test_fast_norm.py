"""ChannelLastBatchNorm1d equals nn.BatchNorm1d (outputs, gradients, running statistics) on the token layout."""
import copy

import pytest
import torch
from torch import nn

from bestcompress.nn import fast_norm
from bestcompress.nn.fast_norm import ChannelLastBatchNorm1d, use_channel_last_batchnorm


def _pair(c, seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.BatchNorm1d(c, **kw)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    fast = copy.deepcopy(ref)
    assert use_channel_last_batchnorm(fast) == 1 and type(fast) is ChannelLastBatchNorm1d
    return ref, fast


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    """Both column-sum paths: the compiled kernels (csrc/norm.cpp) and the torch ops (BESTCOMPRESS_NORM=torch)."""
    monkeypatch.setattr(fast_norm, "_kernel", {})
    if request.param == "torch":
        monkeypatch.setenv("BESTCOMPRESS_NORM", "torch")
    elif fast_norm._cpp() is None:
        pytest.skip("the column-sum kernels cannot be built here")
    return request.param


@pytest.mark.parametrize("mu", [0.0, 3.0, 200.0])  # 200: the mean dwarfs the spread -> var_mean fallback
def test_training_step_equals_batchnorm1d(mu, backend):
    ref, fast = _pair(24)
    assert (fast_norm._cpp() is None) == (backend == "torch")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(6, 10, 24, generator=g) * torch.linspace(0.2, 3, 24) + mu  # [B, N, C]
    grad = torch.randn(6, 24, 10, generator=g)
    outs = []
    for bn in (ref, fast):
        x = tokens.clone().requires_grad_(True)
        y = bn(x.transpose(-1, -2))
        y.backward(grad)
        outs.append((y, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var,
                     bn.num_batches_tracked))
    (y0, gx0, gw0, gb0, rm0, rv0, n0), (y1, gx1, gw1, gb1, rm1, rv1, n1) = outs
    assert y1.shape == y0.shape and y1.transpose(-1, -2).is_contiguous()  # the transpose back is free
    for a, b in ((y1, y0), (gx1, gx0), (gw1, gw0), (gb1, gb0), (rm1, rm0), (rv1, rv0)):
        assert _rel(a, b) < 1e-5
    assert n1.item() == n0.item() == 1


def test_eval_equals_batchnorm1d_and_other_layouts_use_the_parent():
    ref, fast = _pair(16)
    ref.eval(), fast.eval()
    tokens = torch.randn(3, 7, 16)
    assert _rel(fast(tokens.transpose(-1, -2)), ref(tokens.transpose(-1, -2))) < 1e-6
    plain = torch.randn(3, 16, 7)  # contiguous [B, C, N] and [B, C]: nn.BatchNorm1d's own path, bit-equal
    assert torch.equal(fast(plain), ref(plain))
    flat = torch.randn(5, 16)
    assert torch.equal(fast(flat), ref(flat))


def test_state_dict_keys_unchanged_and_momentum_none_falls_back():
    ref, fast = _pair(8, momentum=None)
    assert list(fast.state_dict()) == list(ref.state_dict())
    tokens = torch.randn(4, 5, 8)
    assert torch.equal(fast(tokens.transpose(-1, -2)), ref(tokens.transpose(-1, -2)))
    assert torch.equal(fast.running_var, ref.running_var)


def test_binarized_student_uses_it_and_trains_like_before():
    from bestcompress.convert import binarize
    from bestcompress.zoo import create_model
    torch.manual_seed(0)
    fp = create_model("spikformer_cifar", embed_dims=32, depths=1, num_heads=2, T=2).eval()
    student = binarize(fp, "bestformer").model
    fast = [m for m in student.modules() if type(m) is ChannelLastBatchNorm1d]
    assert fast, "no BatchNorm1d of the binary student was switched"
    plain = copy.deepcopy(student)
    for m in plain.modules():
        if type(m) is ChannelLastBatchNorm1d:
            m.__class__ = nn.BatchNorm1d
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (student, plain):
        model.train()
        out = model(x)
        out = out if isinstance(out, tuple) else (out,)
        sum(o.square().mean() for o in out).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    scale = max(g.abs().max().item() for g in grads[1])
    for a, b in zip(*grads):  # biases feeding a BatchNorm have zero gradient up to rounding: judged on the scale
        assert (a - b).abs().max().item() < 1e-5 * scale
        if b.abs().max().item() > 1e-3 * scale:
            assert _rel(a, b) < 1e-4
