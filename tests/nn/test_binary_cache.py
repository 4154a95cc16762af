"""Eval-mode binary layers compute with a cached ±1 weight: outputs equal to the quantizer path, refreshed when
the weight changes, never used while gradients are needed or a graph is exported."""
import pytest
import torch
from torch import nn

from bestcompress.nn.binary import BinaryConv1d, BinaryConv2d, BinaryLinear

CASES = [(lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), (2, 4, 9, 9), BinaryConv2d),
         (lambda: nn.Conv1d(4, 6, 1), (3, 4, 7), BinaryConv1d),
         (lambda: nn.Linear(5, 7), (3, 2, 5), BinaryLinear)]


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("make,shape,cls", CASES, ids=["conv2d", "conv1d", "linear"])
def test_cached_weight_equals_quantizer_path(make, shape, cls, scaled):
    torch.manual_seed(0)
    layer = cls.from_float(make(), scaled=scaled).eval()
    x = (torch.rand(shape) > 0.5).float()
    with torch.no_grad():
        cached = layer(x)
    assert layer.__dict__.get("_bc_weight_cache") is not None
    reference = layer(x)  # grad enabled and weight.requires_grad: the Brevitas path
    assert reference.requires_grad
    assert torch.equal(cached, reference.detach())


def test_cache_refreshes_when_the_weight_changes():
    torch.manual_seed(0)
    layer = BinaryLinear.from_float(nn.Linear(8, 4)).eval()
    x = torch.rand(2, 8)
    with torch.no_grad():
        first = layer(x)
        layer.weight.mul_(-1.0)
        second = layer(x)
        layer.load_state_dict({"weight": torch.randn(4, 8), "bias": layer.bias.clone()})
        third = layer(x)
    assert torch.allclose(second - layer.bias, -(first - layer.bias))
    want = layer.quant_weight().value.detach().matmul(x.T).T + layer.bias
    assert not torch.allclose(third, second)  # the new weight is used, not the cached one
    torch.testing.assert_close(third, want, atol=1e-6, rtol=0)  # (F.linear and matmul may round differently)


def test_cache_is_not_used_when_quant_weight_is_patched_for_export():
    torch.manual_seed(0)
    layer = BinaryLinear.from_float(nn.Linear(8, 4)).eval()
    calls = []
    original = layer.quant_weight
    layer.quant_weight = lambda *a, **k: calls.append(1) or original(*a, **k)
    with torch.no_grad():
        layer(torch.rand(2, 8))
    assert calls and "_bc_weight_cache" not in layer.__dict__
    assert "_bc_weight_cache" not in layer.state_dict()
