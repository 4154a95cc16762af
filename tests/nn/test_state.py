"""reset_state: one reset for every neuron kind bestcompress produces or keeps."""
import pytest
import torch
from torch import nn

from bestcompress.nn.attention import StepAttentionScale
from bestcompress.nn.leaky import Leaky
from bestcompress.nn.lif import LIF
from bestcompress.nn.state import has_state, reset_state, stateful_modules
from bestcompress.training.evaluation import neuron_reset_fn


def test_bestcompress_neurons_restart_from_rest():
    torch.manual_seed(0)
    x = torch.rand(3, 5) * 3
    lif, leaky, scale = LIF(step_mode="s"), Leaky(beta=0.8, init_hidden=True), StepAttentionScale(3, 1)
    model = nn.ModuleDict({"lif": lif, "leaky": leaky, "scale": scale, "multi": LIF()})
    first = (lif(x), leaky(x))
    scale(torch.ones(2, 1, 2, 2))
    assert lif.v is not None and leaky.mem.abs().sum() > 0 and scale._steps == 1
    assert sorted(n for n, _ in stateful_modules(model)) == ["leaky", "lif", "multi", "scale"]
    reset_state(model)
    assert lif.v is None and leaky.mem.abs().sum() == 0 and scale._steps == 0
    assert torch.equal(lif(x), first[0]) and torch.equal(leaky(x), first[1])


def test_leaky_with_explicit_membrane_stores_nothing():
    leaky = Leaky(beta=0.8)
    spk, mem = leaky(torch.rand(2, 4) * 3, leaky.init_leaky())
    assert mem.shape == (2, 4) and leaky.mem.numel() == 0


def test_spikingjelly_and_snntorch_neurons_are_reset():
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    snn = pytest.importorskip("snntorch")
    sj, st = neuron.LIFNode(step_mode="s"), snn.Leaky(beta=0.9, init_hidden=True)
    model = nn.Sequential(sj, st)
    x = torch.rand(2, 4) * 2 + 1.5
    first = model(x)
    assert not torch.equal(model(x), first)  # state carried over
    reset = neuron_reset_fn(model)  # the trainer's per-batch reset
    assert reset is not None
    reset()
    assert torch.equal(model(x), first)


def test_a_model_without_state_needs_no_reset():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert not has_state(model) and neuron_reset_fn(model) is None
    reset_state(model)  # harmless
