"""BinarizeAttention: binary maps on Q·Kᵀ·V chains, exact re-association, softmax refusal, Hadamard attention
left alone, intercepted (untraceable) blocks and per-step (model loops over time) attention."""
import pytest
import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.model_facts import example_input_for
from bestcompress.errors import ModelError
from bestcompress.nn.attention import AttentionMapNeuron, AttentionScale
from bestcompress.nn.intercept import InterceptedAttention
from bestcompress.nn.lif import LIF
from bestcompress.passes import BinarizeAttention, PassContext, Pipeline
from bestcompress.passes.binarize_attention import StepAttentionScale, find_attention_chains
from bestcompress.passes.neuron_check import deepcopy_module
from bestcompress.trace import graph_modules, trace_model
from bestcompress.zoo import tiny_model
from tests.thirdparty_models import SoftmaxAttentionNet

NO_COUPLINGS = {"reversible.enabled": False}


def _traced(name):
    torch.manual_seed(0)
    model = tiny_model(name).eval()
    x = example_input_for(model, seed=1)
    gm, _ = trace_model(deepcopy_module(model))
    return model, gm, x


def _attn_lif_input(model, x, path="block.0.attn.attn_lif"):
    seen = []
    h = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0]


@pytest.mark.parametrize("name, form", [("spikformer_cifar", "qk"), ("spikformer_imagenet", "kv")])
def test_chains_are_found_with_the_models_own_association(name, form):
    _, gm, _ = _traced(name)
    chains = find_attention_chains(gm)
    assert len(chains) == 2 and {c.form for c in chains} == {form}


@pytest.mark.parametrize("name, target", [("spikformer_imagenet", "qk"), ("spikformer_cifar", "kv")])
def test_reassociation_is_exact_before_the_map_neuron(name, target):
    model, gm, x = _traced(name)
    ctx = PassContext(example_input=x, time_steps=model.T)
    out = Pipeline([BinarizeAttention(ctx, map=target, learnable_scale=False)]).apply(gm)
    maps = {}
    for n, m in out.named_modules():
        if isinstance(m, AttentionMapNeuron):
            m.register_forward_pre_hook(lambda mod, a, n=n: maps.__setitem__(n, tuple(a[0].shape)))
    _attn_lif_input(out, x)
    N = x.shape[-1] * x.shape[-2] // 16 ** 2 if name == "spikformer_imagenet" else (x.shape[-1] // 4) ** 2
    d = 64 // 2
    side = N if target == "qk" else d
    assert maps and all(s[-2:] == (side, side) for s in maps.values())  # the map the recipe asked for
    for n in list(maps):  # the neuron replaced by identity: only the re-association is left
        parent, _, attr = n.rpartition(".")
        setattr(out.get_submodule(parent), attr, nn.Identity())
    torch.testing.assert_close(_attn_lif_input(out, x), _attn_lif_input(model, x), rtol=1e-5, atol=1e-5)


def test_softmax_attention_is_refused_unless_replaced():
    torch.manual_seed(0)
    model = SoftmaxAttentionNet().eval()
    with pytest.raises(ModelError, match="softmax"):
        binarize(model, overrides=NO_COUPLINGS)
    result = binarize(model, overrides={**NO_COUPLINGS, "attention.softmax": "replace"})
    gm = result.model
    assert not any("softmax" in str(n.target) for n in gm.graph.nodes)
    assert sum(isinstance(m, AttentionMapNeuron) for m in gm.modules()) == 1
    assert result.model(example_input_for(model)).shape == (2, 3)


def test_hadamard_attention_is_left_alone_with_a_note():
    torch.manual_seed(0)
    result = binarize(tiny_model("sdt_v1").eval(), overrides=NO_COUPLINGS)
    assert not any(isinstance(m, (AttentionMapNeuron, AttentionScale)) for m in result.model.modules())
    assert any("left alone" in n for n in result.notes)


def test_lambda_scale_follows_each_map():
    torch.manual_seed(0)
    result = binarize(tiny_model("spikformer_cifar").eval(), overrides=NO_COUPLINGS)
    scales = [m for m in result.model.modules() if isinstance(m, AttentionScale)]
    assert len(scales) == 2 and all(s.lam.shape == (2, 1, 2, 1, 1) for s in scales)
    assert any("2 attention map(s) binarized" in n for n in result.notes)


class _PerStepAttention(nn.Module):
    """One time step of attention ([B, N, D]); the neurons keep their membrane across the model's loop."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_lif, self.k_lif, self.v_lif = (LIF(step_mode="s") for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q = self.q_lif(self.q(x)).reshape(B, N, self.heads, D // self.heads).transpose(1, 2)
        k = self.k_lif(self.k(x)).reshape(B, N, self.heads, D // self.heads).transpose(1, 2)
        v = self.v_lif(self.v(x)).reshape(B, N, self.heads, D // self.heads).transpose(1, 2)
        y = (q @ k.transpose(-2, -1)) * 0.125 @ v
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class _LoopModel(nn.Module):
    def __init__(self, T=3):
        super().__init__()
        self.T = T
        self.input_shape = (T, 4, 8)
        self.embed = nn.Linear(8, 8)
        nn.init.normal_(self.embed.weight, std=2.0)  # strong enough that the maps fire
        self.attn = _PerStepAttention()
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # [B, T, N, 8]
        out = 0
        for t in range(x.size(1)):
            out = out + self.head(self.attn(self.embed(x[:, t])).mean(1))
        return out


def _reset_all(model):
    """Clear single-step state before a run, as spikingjelly's functional.reset_net does."""
    for m in model.modules():
        if isinstance(m, LIF):
            m.reset()


class _UnrolledLoopModel(_LoopModel):
    def forward(self, x):  # range over a constant: fx unrolls the loop into one graph
        out = 0
        for t in range(self.T):
            out = out + self.head(self.attn(self.embed(x[:, t])).mean(1))
        return out


@pytest.mark.parametrize("cls", [_LoopModel, _UnrolledLoopModel], ids=["eager-loop", "unrolled-loop"])
def test_per_step_attention_gets_a_stateful_map_neuron_over_the_t_calls(cls):
    torch.manual_seed(0)
    model = cls().eval()
    result = binarize(model, overrides=NO_COUPLINGS)
    gm = result.model if cls is _UnrolledLoopModel else result.model.attn
    assert [g for _, g in graph_modules(result.model)] == [gm]
    (neuron,) = [m for m in gm.modules() if isinstance(m, AttentionMapNeuron)]
    (scale,) = [m for m in gm.modules() if isinstance(m, AttentionScale)]
    assert (neuron.step_mode, neuron.period, neuron.time_merged) == ("s", 3, False)
    assert isinstance(scale, StepAttentionScale) and scale.lam.shape == (3, 1, 2, 1, 1)
    ins, outs = [], []

    def record(mod, args, out):
        ins.append(args[0].detach())
        outs.append(out.detach())

    neuron.register_forward_hook(record)
    x = torch.rand((2,) + model.input_shape) * 2
    _reset_all(result.model)
    y1 = result.model(x)
    assert len(ins) == 3 and outs[0].shape == (2, 2, 4, 4)  # [B, heads, N, N] per call
    expected = AttentionMapNeuron(3)(torch.stack(ins))  # the same map neuron run multi-step over T
    assert torch.equal(torch.stack(outs), expected) and 0 < expected.mean() < 1
    ins.clear(), outs.clear()
    _reset_all(result.model)
    assert torch.equal(result.model(x), y1)
    assert torch.equal(torch.stack(outs), expected)  # the map neuron restarted by itself (period T)


def test_untraceable_snntorch_attention_is_intercepted_per_step():
    pytest.importorskip("snntorch")
    from tests.thirdparty_models import SnnTorchSpikformer
    torch.manual_seed(0)
    model = SnnTorchSpikformer().eval()
    result = binarize(model, overrides=NO_COUPLINGS)
    attn = result.model.blocks[0].attn
    assert isinstance(attn, InterceptedAttention)
    assert (attn.map_neuron.step_mode, attn.map_neuron.period) == ("s", model.num_steps)
    assert isinstance(attn.map_scale, StepAttentionScale)
    assert callable(attn.init_mems)  # the wrapped block's helpers stay reachable for the eager parent
    assert any("intercepted" in n for n in result.notes)
    maps = []
    attn.map_neuron.register_forward_hook(lambda m, a, o: maps.append(o))
    x = torch.rand((2,) + model.input_shape)
    y = result.model(x)
    assert len(maps) == model.num_steps and all(set(m.unique().tolist()) <= {0.0, 1.0} for m in maps)
    assert torch.equal(result.model(x), y)
