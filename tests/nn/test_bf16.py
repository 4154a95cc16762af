"""train.precision bf16 (nn/bf16.py): binary layers on bf16 products give float32's forward bit for bit on spike
inputs (bias-free; with a bias, the correctly rounded sum), gradients within 1 % (relative norm), float32 forwards
on real-valued inputs and sums too large for bf16, and nothing changes outside the block or for scaled weights."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.errors import RecipeError
from bestcompress.nn.bf16 import bf16_active, binary_bf16, plan
from bestcompress.nn.binary import BinaryConv1d, BinaryConv2d, BinaryLinear
from bestcompress.recipe import load_recipe
from bestcompress.zoo import create_model

GRAD_REL = 1e-2  # gradients: bf16-rounded incoming gradient (about 2^-8 per element), measured ~2e-3..4e-3

LAYERS = {  # (float layer, input shape): K = 300 and 576 exceed 256, the sizes bf16 holds exactly
    "linear": (lambda b: nn.Linear(300, 24, bias=b), (3, 50, 300)),
    "conv2d": (lambda b: nn.Conv2d(64, 16, 3, padding=1, bias=b), (4, 64, 7, 7)),
    "conv2d_strided": (lambda b: nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=b), (2, 8, 9, 9)),
    "conv1d": (lambda b: nn.Conv1d(16, 12, 1, bias=b), (4, 16, 20)),
}
SWAP = {nn.Linear: BinaryLinear, nn.Conv2d: BinaryConv2d, nn.Conv1d: BinaryConv1d}


def _layer(kind, bias, scaled=False):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    fp = make(bias)
    layer = SWAP[type(fp)].from_float(fp, scaled=scaled).train()
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    return layer, x


def _run(layer, x, bf16):
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    with binary_bf16(bf16):
        y = layer(xi)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    grads = [xi.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return y.detach(), grads


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_spike_forward_is_float32_bit_for_bit_and_gradients_close(kind):
    layer, x = _layer(kind, bias=False)
    y32, g32 = _run(layer, x, False)
    y16, g16 = _run(layer, x, True)
    assert torch.equal(y16, y32)
    for a, b in zip(g16, g32):
        assert _rel(a, b) < GRAD_REL
    assert _rel(g16[0], g32[0]) > 0  # the bf16 backward did run (float32 would be exact)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_with_a_bias_the_sum_is_rounded_once(kind):
    layer, x = _layer(kind, bias=True)
    with torch.no_grad():
        layer.bias.normal_()
    y32, _ = _run(layer, x, False)
    y16, g16 = _run(layer, x, True)
    w = layer.binary_weight().double()
    if kind == "linear":
        exact = nn.functional.linear(x.double(), w, layer.bias.double())
    else:
        exact = nn.functional.conv2d(x.double(), w, layer.bias.double(), padding=1)
    assert torch.equal(y16, exact.float())  # exact integer sum + bias, one rounding
    ulp = torch.finfo(torch.float32).eps * float(exact.abs().max())
    assert float((y32.double() - exact).abs().max()) <= 2 * ulp  # float32 itself is within a couple of ulps


def test_sums_beyond_bf16_fall_back_to_float32():
    layer = BinaryConv2d.from_float(nn.Conv2d(64, 4, 3, padding=1, bias=False)).train()
    with torch.no_grad():
        layer.weight.fill_(0.3)  # standardised 0 -> sign +1 everywhere: every output sums up to 576 ones
    x = torch.ones(1, 64, 5, 5)
    y32, _ = _run(layer, x, False)
    y16, _ = _run(layer, x, True)
    assert float(y32.abs().max()) == 576.0 and torch.equal(y16, y32)


@pytest.mark.parametrize("values", ["real", "half", "negative_zero"])
def test_inputs_other_than_0_1_keep_the_float32_forward(values):
    layer, x = _layer("linear", bias=True)
    if values == "real":
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    elif values == "half":
        x = x * 0.5
    else:
        x = torch.where(x > 0, x, torch.full_like(x, -0.0))
    with binary_bf16():
        assert plan(layer, x.requires_grad_(True), layer.quant_weight().value) is False
        with torch.no_grad():
            assert plan(layer, x, layer.binary_weight()) is None  # no gradient wanted: nothing to gain
    y32, g32 = _run(layer, x.detach(), False)
    y16, g16 = _run(layer, x.detach(), True)
    assert torch.equal(y16, y32)
    for a, b in zip(g16, g32):
        assert _rel(a, b) < GRAD_REL


def test_scaled_weights_and_outside_the_block_are_untouched():
    layer, x = _layer("conv2d", bias=False, scaled=True)
    with binary_bf16():
        assert plan(layer, x, layer.quant_weight().value) is None
    y32, g32 = _run(layer, x, False)
    y16, g16 = _run(layer, x, True)
    assert torch.equal(y16, y32) and all(torch.equal(a, b) for a, b in zip(g16, g32))
    plain, x = _layer("linear", bias=False)
    assert not bf16_active() and plan(plain, x, plain.quant_weight().value) is None
    with binary_bf16():
        assert bf16_active()
        with binary_bf16(False):
            assert bf16_active()  # nested: the outer block still holds
    assert not bf16_active()


def test_student_step_matches_float32():
    torch.manual_seed(0)
    fp = create_model("spikformer_cifar", num_classes=10, img_size=16, embed_dims=32, num_heads=2, depths=1, T=2)
    student = binarize(copy.deepcopy(fp).eval(), "bestformer").model.train()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def step(bf16):
        student.zero_grad(set_to_none=True)
        with binary_bf16(bf16):
            out = student(x)
            out = out[0] + out[1] if isinstance(out, tuple) else out
            out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    state = copy.deepcopy(student.state_dict())
    y32, g32 = step(False)
    student.load_state_dict(state)  # the BatchNorm running statistics moved
    y16, g16 = step(True)
    torch.testing.assert_close(y16, y32, rtol=1e-5, atol=1e-6)  # biases: sums rounded once, spikes kept
    top = max(float(g.norm()) for g in g32.values())
    assert max(float((g16[k] - g32[k]).norm()) for k in g32) < GRAD_REL * top


def test_recipe_key():
    assert load_recipe("bestformer").train.precision == "fp32"
    assert load_recipe("bestformer").replace(**{"train.precision": "bf16"}).train.precision == "bf16"
    with pytest.raises(RecipeError, match="train.precision"):
        load_recipe("bestformer").replace(**{"train.precision": "fp16"})
