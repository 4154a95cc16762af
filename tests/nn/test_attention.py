"""The binary attention map neuron and the learnable scale λ, in time-first, T·B-merged and per-step layouts."""
import torch

from bestcompress.nn.attention import AttentionMapNeuron, AttentionScale
from bestcompress.nn.lif import LIF
from bestcompress.passes.binarize_attention import StepAttentionScale

T, B, H, N = 3, 2, 4, 5


def _map(seed=0):
    return torch.randn(T, B, H, N, N, generator=torch.Generator().manual_seed(seed)) * 2


def test_map_neuron_is_a_soft_reset_lif_with_threshold_one_and_emits_binary_maps():
    x = _map()
    neuron = AttentionMapNeuron(T)
    assert (neuron.v_reset, neuron.v_threshold) == (None, 1.0)
    y = neuron(x)
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y, LIF(tau=2.0, v_threshold=1.0, v_reset=None)(x))


def test_map_neuron_time_merged_layout_equals_time_first():
    x = _map(1)
    merged = AttentionMapNeuron(T, time_merged=True)(x.flatten(0, 1))
    assert torch.equal(merged, AttentionMapNeuron(T)(x).flatten(0, 1))


def test_map_neuron_per_step_equals_multi_step_over_t_calls():
    x = _map(2)
    step = AttentionMapNeuron(T)
    step.step_mode, step.period = "s", T
    for _ in range(2):  # two forwards: the period restarts the membrane without a reset
        assert torch.equal(torch.stack([step(x[t]) for t in range(T)]), AttentionMapNeuron(T)(x))


def test_attention_scale_lambda_shape_and_layouts():
    y = _map(3)
    scale = AttentionScale(T, H)
    assert scale.lam.shape == (T, 1, H, 1, 1) and torch.equal(scale.lam, torch.ones_like(scale.lam))
    with torch.no_grad():
        scale.lam.copy_(torch.arange(T * H, dtype=torch.float32).view(T, 1, H, 1, 1))
    expected = y * scale.lam
    assert torch.equal(scale(y), expected)
    merged = AttentionScale(T, H, time_merged=True)
    merged.load_state_dict(scale.state_dict())
    assert torch.equal(merged(y.flatten(0, 1)), expected.flatten(0, 1))
    step = StepAttentionScale(T, H)
    step.load_state_dict(scale.state_dict())
    assert torch.equal(torch.stack([step(y[t]) for t in range(T)]), expected)
    step.reset()
    assert torch.equal(step(y[0]), expected[0])
    scale(y).sum().backward()
    assert scale.lam.grad is not None
