"""Binary layers: two values per output channel, gradients reach `weight`, FP checkpoints load unchanged."""
import pytest
import torch
from torch import nn

from bestcompress.nn.binary import (BINARY_SWAP_RULES, BinaryConv1d, BinaryConv2d, BinaryLinear, is_binary_layer,
                                    standardize_per_channel)

FLOAT_LAYERS = {
    "linear": (lambda: nn.Linear(12, 6), (4, 12)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1, bias=False), (2, 3, 5, 5)),
}


def _binary(kind, scaled=False):
    torch.manual_seed(0)
    make, shape = FLOAT_LAYERS[kind]
    fp = make()
    return fp, BINARY_SWAP_RULES[type(fp)].from_float(fp, scaled=scaled), torch.randn(shape)


@pytest.mark.parametrize("kind", sorted(FLOAT_LAYERS))
def test_binary_weight_is_sign_of_standardized_weight(kind):
    fp, layer, _ = _binary(kind)
    assert is_binary_layer(layer) and not is_binary_layer(fp)
    wb = layer.binary_weight()
    assert set(wb.unique().tolist()) <= {-1.0, 1.0}
    for c in range(wb.shape[0]):
        assert len(wb[c].unique()) == 2  # exactly two values per output channel
    expected = torch.where(standardize_per_channel(fp.weight.detach()) >= 0, 1.0, -1.0)
    assert torch.equal(wb, expected)


@pytest.mark.parametrize("kind", sorted(FLOAT_LAYERS))
def test_sign_scaled_values_are_plus_minus_mean_abs_standardized(kind):
    fp, layer, _ = _binary(kind, scaled=True)
    wb = layer.binary_weight()
    alpha = standardize_per_channel(fp.weight.detach()).abs().flatten(1).mean(1)
    for c in range(wb.shape[0]):
        values = sorted(wb[c].unique().tolist())
        assert values == pytest.approx([-alpha[c].item(), alpha[c].item()], rel=1e-5)


@pytest.mark.parametrize("kind", sorted(FLOAT_LAYERS))
def test_forward_uses_binary_weight_and_gradients_reach_weight(kind):
    fp, layer, x = _binary(kind)
    y = layer(x)
    functional = {BinaryLinear: nn.functional.linear, BinaryConv1d: nn.functional.conv1d,
                  BinaryConv2d: nn.functional.conv2d}[type(layer)]
    kwargs = {} if isinstance(layer, BinaryLinear) else dict(padding=layer.padding)
    torch.testing.assert_close(y, functional(x, layer.binary_weight(), layer.bias, **kwargs))
    y.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    if layer.bias is not None:
        assert layer.bias.grad is not None


@pytest.mark.parametrize("kind", sorted(FLOAT_LAYERS))
def test_float_state_dict_loads_strictly(kind):
    fp, layer, _ = _binary(kind)
    other = FLOAT_LAYERS[kind][0]()  # different random weights
    result = layer.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.weight, other.weight)
    assert set(layer.state_dict()) == set(other.state_dict())


def test_from_float_copies_weight_bias_and_hyper_parameters():
    fp = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, groups=1)
    layer = BinaryConv2d.from_float(fp)
    assert torch.equal(layer.weight, fp.weight) and torch.equal(layer.bias, fp.bias)
    assert (layer.stride, layer.padding, layer.kernel_size) == (fp.stride, fp.padding, fp.kernel_size)
    assert layer.training == fp.training
