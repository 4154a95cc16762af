"""binarize() keeps the model's state semantics: every converted model is a function of its input (two calls on
one input agree), and with the identity recipe equals its source model."""
import pytest
import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.errors import ModelError
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
    assert len(leaky) == 13 and any(isinstance(m, AttentionMapNeuron) for m in result.model.modules())
    x = example_input_for(model, seed=2)
    student = result.model.train()
    for _ in range(2):  # a stored membrane from the first batch would make the second backward fail
        student(x).sum().backward()
    assert all(m.mem.numel() == 0 for m in leaky)  # nothing of a forward survives it
    assert any("fresh state" in n for n in result.notes)


def test_snntorch_hidden_state_reset_inside_forward_is_replayed_by_the_graph():
    pytest.importorskip("snntorch")
    model = _model("snntorch-hidden")
    result = binarize(model, "identity")
    kept = [m for m in result.model.modules() if isinstance(m, Leaky) and m.init_hidden]
    assert len(kept) == 2  # canonicalised init_hidden neurons keep their membrane between calls ...
    x = example_input_for(model, seed=1) * 3
    with torch.no_grad():
        first = result.model(x)
        assert all(m.mem.abs().sum() > 0 for m in kept)
        assert torch.equal(result.model(x), first)  # ... and the forward's utils.reset(self) still clears it


# --------------------------------------------------------------------------------- the input shape, inferred

class _ImageNet(torch.nn.Module):
    """Public-code style: sizes as constructor attributes on a child, the input shape declared nowhere else."""

    def __init__(self, with_size=True):
        super().__init__()
        from bestcompress.nn.lif import LIF
        self.patch_embed = torch.nn.Module()
        if with_size:
            self.patch_embed.img_size_h, self.patch_embed.img_size_w = 8, 6
        self.patch_embed.proj_conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.lif = LIF()
        self.mid = torch.nn.Conv2d(4, 4, 1)
        self.head = torch.nn.Linear(4, 3)
        self.T = 2

    def forward(self, x):
        y = self.patch_embed.proj_conv(x).unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        y = self.lif(y).flatten(0, 1)
        return self.head(self.mid(y).mean((2, 3))).reshape(self.T, x.shape[0], -1).mean(0)


class _Seq(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 4, 3, padding=1)
        self.mid = torch.nn.Conv1d(4, 4, 1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.mid(self.conv(x)).mean(2))


def test_input_shape_comes_from_size_attributes_and_the_first_conv():
    from bestcompress.model_facts import model_input_shape
    assert model_input_shape(_ImageNet()) == (2, 8, 6)
    timm_style = _ImageNet(with_size=False)
    timm_style.default_cfg = {"input_size": (2, 10, 10)}
    assert model_input_shape(timm_style) == (2, 10, 10)
    result = binarize(_ImageNet(), overrides={"reversible.enabled": False})  # no input shape passed
    assert result.model.bc_input_shape == (2, 8, 6)
    seq = _Seq()
    seq.seq_len = 12
    assert model_input_shape(seq) == (1, 12)


@pytest.mark.parametrize("model, expected", [
    (_ImageNet(with_size=False), r"--input-shape C,H,W \(its first layer 'patch_embed.proj_conv' is a Conv2d with 2 "
                                 r"input channels, e.g. 2,32,32\)"),
    (_Seq(), r"--input-shape C,L \(its first layer 'conv' is a Conv1d with 1 input channels, e.g. 1,40"),
])
def test_an_unknown_input_shape_says_exactly_what_to_pass(model, expected):
    from bestcompress.errors import ModelError
    with pytest.raises(ModelError, match=expected):
        binarize(model)


class _EventFrames(nn.Module):
    """Takes event frames [B, T, C, H, W] but states only its channels and image size (as Spikformer's DVS code)."""

    def __init__(self):
        super().__init__()
        self.in_channels, self.img_size = 2, 8
        self.conv, self.conv2, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        x = x.permute(1, 0, 2, 3, 4)
        T, B = x.shape[:2]
        return self.head(self.conv2(self.conv(x.flatten(0, 1))).mean((2, 3)).reshape(T, B, -1).mean(0))


def test_inferred_input_shape_that_does_not_fit_says_what_to_pass():
    model = _EventFrames().eval()
    with pytest.raises(ModelError, match=r"shape 2,8,8, read from its attributes.*pass --input-shape\."):
        binarize(model, "bestformer", overrides={"reversible.enabled": False})
    r = binarize(model, "bestformer", input_shape=(2, 2, 8, 8),  # the shape given: it binarizes
                 overrides={"reversible.enabled": False})
    assert is_binary_layer(r.model.conv2)
