"""Repeated calls of one engine layer: the kernel arguments a layer reads once (and again when its tensors are
replaced or the layer is copied), and the int8 route's remembered top plane of the last input, which a new input
of another range must never turn into a wrong result."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bestcompress import engine as E
from bestcompress.engine import compiled_available, kernels, use_backend, use_kernels
from bestcompress.engine.layers import PackedLinear

from .test_runtime import firing_binary  # the tiny Spikformer, built once per session

pytestmark = pytest.mark.skipif(not compiled_available(), reason="the compiled kernels are not built")


def _spikes(g, *shape, p=0.3):
    return (torch.rand(shape, generator=g) < p).to(torch.float32)


@pytest.mark.parametrize("int8", ["all", "multi", "off"])
def test_one_layer_on_inputs_of_changing_range_stays_exact(int8):
    g = torch.Generator().manual_seed(3)
    m, k, n = 40, 100, 24
    w = torch.where(torch.rand(n, k, generator=g) < 0.5, 1.0, -1.0)
    cols = kernels.to_columns(kernels.pack_rows((w > 0).to(torch.float32)).words)  # one weight address throughout
    s = _spikes(g, m, k)
    small = s * 0.25 + _spikes(g, m, k) * 0.125
    wide = s + 4 * _spikes(g, m, k) + 32 * _spikes(g, m, k)
    nine = s + 256 * _spikes(g, m, k)  # 9 planes: more than a byte
    for x in (s, wide, s, small, wide * 2, nine, s, torch.zeros(m, k), wide, small):
        with use_kernels(int8=int8):
            out, planes, _ = kernels.linear(x, cols, n)
        assert planes == kernels.pack_rows(x).planes
        assert torch.equal(out, F.linear(x, w))
    for bad in (-s, s * 0.1, s * float("nan"), s + float("inf")):
        with use_kernels(int8=int8):
            kernels.linear(wide, cols, n)  # the remembered range is a valid one
            assert kernels.linear(bad, cols, n, max_planes=12) is None  # values that do not pack are refused


def test_a_copied_engine_reads_its_own_weights_and_a_replaced_tensor_is_read_again():
    engine = E.from_model(firing_binary("spikformer_cifar"))
    x = torch.rand((2,) + engine.input_shape, generator=torch.Generator().manual_seed(1))
    ref = engine(x)  # the layers have read their kernel arguments
    twin = copy.deepcopy(engine.model)
    linears = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
    assert linears
    for layer in linears:
        layer.weight_words.zero_()  # the original's weights change in place
    assert not torch.equal(engine(x), ref)
    with torch.no_grad():
        assert torch.equal(twin(x), ref)  # the copy computed with its own words, not the original's addresses

    layer = next(m for m in twin.modules() if isinstance(m, PackedLinear))
    s = _spikes(torch.Generator().manual_seed(2), 8, layer.in_features)
    before = layer(s)
    layer.bias = layer.bias + 1.0  # a new tensor in place of the old one
    after = layer(s)
    with use_backend("numpy"):
        want = layer(s)
    assert torch.equal(after, want) and not torch.equal(after, before)
