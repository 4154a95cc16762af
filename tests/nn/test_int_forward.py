"""The exact integer forward of binary convolutions on spikes (nn/int_forward.py): bit for bit the float32 path."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.nn import int_forward
from bestcompress.nn.bf16 import binary_bf16
from bestcompress.nn.binary import BinaryConv2d
from bestcompress.zoo import create_model


@pytest.fixture(scope="module")
def kernel():
    mod = int_forward._kernel()
    if mod is None:
        pytest.skip("no compiler / oneDNN quantized convolution here: the float32 path runs everywhere")
    return mod


@pytest.fixture
def plain_path(kernel):
    """A context in which every call takes the float32 path."""
    return int_forward.disabled()


def _conv(c_in, c_out, k, stride=1, padding=1, groups=1, bias=False, scaled=False):
    torch.manual_seed(0)
    return BinaryConv2d.from_float(nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, groups=groups,
                                             bias=bias), scaled=scaled).train()


def _run(conv, x):
    x = x.clone().requires_grad_(True)
    conv.zero_grad(set_to_none=True)
    y = conv(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
    return y.detach(), x.grad, conv.weight.grad, type(y.grad_fn).__name__


def _spikes(*shape, p=0.3):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(1)) < p).float()


@pytest.mark.parametrize("c_in,c_out,k,stride,padding,groups", [(16, 32, 3, 1, 1, 1), (8, 16, 3, 2, 1, 1),
                                                                 (24, 12, 1, 1, 0, 1), (16, 16, 3, 1, 1, 4)])
def test_spike_input_is_bit_for_bit_the_float32_layer(plain_path, c_in, c_out, k, stride, padding, groups):
    conv = _conv(c_in, c_out, k, stride, padding, groups)
    x = _spikes(4, c_in, 12, 12)
    y, gx, gw, fn = _run(conv, x)
    assert fn == "_IntForwardConvBackward"  # the integer forward ran
    with plain_path:
        y0, gx0, gw0, fn0 = _run(conv, x)
    assert fn0 != fn
    assert torch.equal(y, y0) and torch.equal(gx, gx0) and torch.equal(gw, gw0)


@pytest.mark.parametrize("bad", [0.5, 2.0, -0.0, float("nan"), 1.0 + 2 ** -23])
def test_other_inputs_keep_the_float32_forward(kernel, bad):
    conv = _conv(8, 8, 3)
    x = _spikes(2, 8, 9, 9)
    x.view(-1)[37] = bad  # one element is enough
    assert kernel.spikes_to_u8(x).numel() == 0
    assert _run(conv, x)[3] == "ConvolutionBackward0"


@pytest.mark.parametrize("kw", [dict(bias=True), dict(scaled=True)])
def test_bias_and_scaled_weights_keep_the_float32_forward(kernel, kw):
    conv = _conv(8, 8, 3, **kw)
    assert _run(conv, _spikes(2, 8, 9, 9))[3] == "ConvolutionBackward0"


def test_kernels_equal_torch(kernel):
    x = _spikes(3, 5, 7, 11)
    assert torch.equal(kernel.spikes_to_u8(x), x.to(torch.uint8))
    y = torch.randn(3, 37, 5, 7).contiguous(memory_format=torch.channels_last)
    out = kernel.nhwc_to_nchw(y)
    assert out.is_contiguous() and torch.equal(out, y)


def test_student_step_equals_the_float32_path(plain_path):
    """A binarized Spikformer (its tokenizer's convolutions read spikes): logits and every gradient bit-equal."""
    torch.manual_seed(0)
    fp = create_model("spikformer_cifar", num_classes=10, img_size=16, embed_dims=32, num_heads=2, depths=1, T=2)
    student = binarize(copy.deepcopy(fp).eval(), "bestformer").model.train()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    state = copy.deepcopy(student.state_dict())
    calls = []

    def step():
        student.load_state_dict(state)
        student.zero_grad(set_to_none=True)
        out = student(x)
        out = out[0] + out[1] if isinstance(out, tuple) else out
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    orig = int_forward._IntForwardConv.apply

    def counting(*a):
        calls.append(1)
        return orig(*a)
    int_forward._IntForwardConv.apply = counting
    try:
        y, g = step()
    finally:
        int_forward._IntForwardConv.apply = orig
    assert len(calls) >= 3  # the tokenizer's convolutions after the first (which reads the image)
    with plain_path:
        y0, g0 = step()
    assert torch.equal(y, y0)
    assert g.keys() == g0.keys() and all(torch.equal(g[k], g0[k]) for k in g)


def test_bf16_mode_uses_its_own_path(kernel):
    conv = _conv(8, 8, 3)
    with binary_bf16():
        assert _run(conv, _spikes(2, 8, 9, 9))[3] != "_IntForwardConvBackward"


def test_channels_last_spikes_give_the_same_output_channels_last(kernel):
    """Fed channels-last spikes (nn/channels_last.py), the integer forward returns oneDNN's channels-last output
    with the contiguous input's values bit for bit, and the same gradients up to float rounding (oneDNN sums the
    weight gradient in another order on channels-last memory)."""
    conv = _conv(16, 32, 3)
    x = _spikes(4, 16, 12, 12)
    y, gx, gw, fn = _run(conv, x)
    y_cl, gx_cl, gw_cl, fn_cl = _run(conv, x.contiguous(memory_format=torch.channels_last))
    assert fn == fn_cl == "_IntForwardConvBackward"
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and y.is_contiguous()
    assert torch.equal(y, y_cl)
    for a, b in ((gw, gw_cl), (gx, gx_cl)):
        assert float((a - b).norm() / a.norm()) < 1e-6
