"""BinarizeAttention: binary maps on Q·Kᵀ·V chains, exact re-association, softmax refusal, Hadamard attention
left alone, intercepted (untraceable) blocks and per-step (model loops over time) attention."""
import pytest
import torch
from torch import fx, nn

from bestcompress.convert import binarize
from bestcompress.model_facts import example_input_for
from bestcompress.errors import ModelError
from bestcompress.nn.attention import AttentionMapNeuron, AttentionScale
from bestcompress.nn.intercept import InterceptedAttention
from bestcompress.nn.leaky import Leaky
from bestcompress.nn.lif import LIF
from bestcompress.passes import BinarizeAttention, PassContext, Pipeline
from bestcompress.nn.attention import StepAttentionScale, StepMapNeuron
from bestcompress.nn.state import call_state_method, reset_state
from bestcompress.passes.binarize_attention import find_attention_chains
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


@pytest.mark.parametrize("cls", [_LoopModel, _UnrolledLoopModel], ids=["range-over-size", "range-over-T"])
def test_time_loop_attention_shares_one_map_neuron_whose_membrane_the_graph_threads(cls):
    torch.manual_seed(0)
    model = cls().eval()
    result = binarize(model, overrides=NO_COUPLINGS)
    gm = result.model  # `range(x.size(1))` is specialised on the example's T, so both loops unroll into one graph
    assert isinstance(gm, fx.GraphModule) and gm.bc_time_steps == 3
    (neuron,) = [m for m in gm.modules() if isinstance(m, AttentionMapNeuron)]
    (scale,) = [m for m in gm.modules() if isinstance(m, AttentionScale)]
    assert isinstance(neuron, StepMapNeuron) and isinstance(scale, StepAttentionScale)
    assert scale.lam.shape == (3, 1, 2, 1, 1)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is neuron]
    assert len(calls) == 3 and calls[0].args[1] is None  # step 0 starts from rest, ...
    assert all(c.args[1].args[0] is p for p, c in zip(calls, calls[1:]))  # ... step t from step t-1's membrane
    steps = [n.args[1] for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is scale]
    assert steps == [0, 1, 2]
    ins, outs = [], []

    def record(mod, args, out):
        ins.append(args[0].detach())
        outs.append(out[0].detach())

    neuron.register_forward_hook(record)
    x = torch.rand((2,) + model.input_shape) * 2
    _reset_all(result.model)
    y1 = result.model(x)
    assert len(ins) == 3 and outs[0].shape == (2, 2, 4, 4)  # [B, heads, N, N] per step
    expected = AttentionMapNeuron(3)(torch.stack(ins))  # the same map neuron run multi-step over T
    assert torch.equal(torch.stack(outs), expected) and 0 < expected.mean() < 1
    ins.clear(), outs.clear()
    _reset_all(result.model)
    assert torch.equal(result.model(x), y1)
    assert torch.equal(torch.stack(outs), expected)
    if cls is _LoopModel:
        assert any("specialised" in n and "index(size) = 3" in n for n in result.notes)


class _ValueBranchAttention(_PerStepAttention):
    def forward(self, x):
        if x.abs().sum() == 0:  # a branch on a tensor value: untraceable, so the block stays a leaf
            return x
        return super().forward(x)


class _EagerAttentionLoop(_LoopModel):
    def __init__(self, T=3):
        super().__init__(T)
        self.attn = _ValueBranchAttention()


def test_untraceable_attention_called_per_step_is_intercepted_with_a_stateful_map_neuron():
    torch.manual_seed(0)
    model = _EagerAttentionLoop().eval()
    result = binarize(model, overrides=NO_COUPLINGS)
    attn = result.model.attn
    assert isinstance(attn, InterceptedAttention)
    assert (attn.map_neuron.step_mode, attn.map_neuron.period) == ("s", 3)
    assert isinstance(attn.map_scale, StepAttentionScale)
    maps = []
    attn.map_neuron.register_forward_hook(lambda m, a, o: maps.append(o))
    x = torch.rand((2,) + model.input_shape) * 2
    _reset_all(result.model)
    y = result.model(x)
    assert len(maps) == 3 and all(set(m.unique().tolist()) <= {0.0, 1.0} for m in maps)
    reset_state(result.model)
    assert torch.equal(result.model(x), y)


def test_snntorch_time_loop_traces_whole_and_stays_a_function_of_its_input():
    pytest.importorskip("snntorch")
    from tests.thirdparty_models import SnnTorchSpikformer
    torch.manual_seed(0)
    model = SnnTorchSpikformer().eval()
    result = binarize(model, overrides=NO_COUPLINGS)
    gm = result.model  # `x.dim() == 2` and `range(x.size(1))` specialised on the example input
    assert isinstance(gm, fx.GraphModule) and gm.bc_time_steps == model.num_steps
    assert [type(m) for m in gm.modules() if isinstance(m, AttentionMapNeuron)] == [StepMapNeuron]
    # the init_hidden neuron's reset inside forward (init_mems) runs on every call of the graph
    resets = [n for n in gm.graph.nodes if n.target is call_state_method and n.args[0].target == "blocks.0.fc1_lif"]
    assert [n.args[1] for n in resets] == ["reset_mem"] and type(gm.get_submodule("blocks.0.fc1_lif")) is Leaky
    maps = []
    gm.get_submodule("blocks.0.attn.attn_map_lif").register_forward_hook(lambda m, a, o: maps.append(o[0]))
    x = torch.rand((2,) + model.input_shape)
    with torch.no_grad():
        y = gm(x)
        assert torch.equal(gm(x), y)  # no state survives a forward
    assert len(maps) == 2 * model.num_steps and all(set(m.unique().tolist()) <= {0.0, 1.0} for m in maps)


def test_a_single_head_time_first_map_is_not_read_as_batch_heads():
    """A [T, B, N, N] map (one head, time first, not merged) gets λ of one head, so the binary model runs at any
    batch size (reading it as [T·B, heads, N, N] made λ's heads = the example's batch size)."""
    from tests.topology_models import LogitsAndNone, example
    from bestcompress.convert import binarize
    from bestcompress.nn.attention import AttentionScale
    torch.manual_seed(0)
    model = LogitsAndNone().eval()
    student = binarize(model, "bestformer", example_input=example(3)).model.eval()
    scales = [m for m in student.modules() if isinstance(m, AttentionScale)]
    assert scales and all(tuple(m.lam.shape) == (model.T, 1, 1, 1, 1) for m in scales)
    with torch.no_grad():
        for batch in (1, 5, 7):
            logits, aux = student(example(batch))
            assert logits.shape == (batch, 4) and aux is None
