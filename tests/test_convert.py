"""binarize() keeps the model's state semantics: every converted model is a function of its input (two calls on
one input agree), and with the identity recipe equals its source model."""
import pytest
import torch

from bestcompress.convert import binarize
from bestcompress.model_facts import example_input_for
from bestcompress.nn.attention import AttentionMapNeuron
from bestcompress.nn.binary import is_binary_layer
from bestcompress.nn.leaky import Leaky
from bestcompress.nn.state import reset_state
from bestcompress.zoo import list_models, tiny_model

THIRD_PARTY = {
    "snntorch-explicit": ("snntorch", "SnnTorchTimeLoopTransformer"),
    "snntorch-hidden": ("snntorch", "SnnTorchHiddenNet"),
    "snntorch-eager-loop": ("snntorch", "SnnTorchSpikformer"),
    "spikingjelly": ("spikingjelly", "SJSpikformer"),
    "norse-style": (None, "NorseStyleNet"),
}


def _model(name):
    torch.manual_seed(0)
    if name in THIRD_PARTY:
        lib, cls = THIRD_PARTY[name]
        if lib:
            pytest.importorskip(lib)
        import tests.thirdparty_models as tp
        return getattr(tp, cls)().eval()
    return tiny_model(name).eval()


def _source_output(model, x):
    reset_state(model)  # spikingjelly neurons keep their membrane between calls in the source model too
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", sorted(THIRD_PARTY) + list_models())
def test_identity_conversion_equals_the_source_and_a_second_call_equals_the_first(name):
    model = _model(name)
    x = example_input_for(model, seed=1) * 3
    expected = _source_output(model, x)
    result = binarize(model, "identity")
    with torch.no_grad():
        first, second = result.model(x), result.model(x)
    assert torch.equal(first, expected)
    assert torch.equal(second, first)


@pytest.mark.parametrize("name", sorted(THIRD_PARTY))
def test_binary_conversion_is_a_function_of_its_input(name):
    model = _model(name)
    x = example_input_for(model, seed=1) * 3
    result = binarize(model, overrides={"reversible.enabled": False})
    assert any(is_binary_layer(m) for m in result.model.modules())
    with torch.no_grad():
        first = result.model(x)
        other = result.model(torch.rand_like(x))  # a different batch in between changes nothing
        second = result.model(x)
    assert torch.equal(second, first) and not torch.equal(other, first)


def test_snntorch_explicit_state_leaves_no_membrane_behind_and_trains_twice():
    pytest.importorskip("snntorch")
    model = _model("snntorch-explicit")
    result = binarize(model, overrides={"reversible.enabled": False})
    leaky = [m for m in result.model.modules() if isinstance(m, Leaky)]
    assert len(leaky) == 10 and any(isinstance(m, AttentionMapNeuron) for m in result.model.modules())
    x = example_input_for(model, seed=2)
    student = result.model.train()
    for _ in range(2):  # a stored membrane from the first batch would make the second backward fail
        student(x).sum().backward()
    assert all(m.mem.numel() == 0 for m in leaky)  # nothing of a forward survives it
    assert any("fresh state" in n for n in result.notes)


def test_snntorch_hidden_state_reset_inside_forward_is_replayed_by_the_graph():
    snn = pytest.importorskip("snntorch")
    model = _model("snntorch-hidden")
    result = binarize(model, "identity")
    kept = [m for m in result.model.modules() if isinstance(m, snn.Leaky)]
    assert kept  # init_hidden neurons keep their membrane between calls ...
    x = example_input_for(model, seed=1) * 3
    with torch.no_grad():
        first = result.model(x)
        assert all(m.mem.abs().sum() > 0 for m in kept)
        assert torch.equal(result.model(x), first)  # ... and the forward's utils.reset(self) still clears it
