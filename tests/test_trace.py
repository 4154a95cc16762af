"""The SNN tracer's fallbacks: failing submodules become leaves, an untraceable root stays eager, None-default
arguments are fixed, neurons of every library are leaves; each fallback is reported."""
import pytest
import torch
from torch import fx, nn

from bestcompress.nn.lif import LIF
from bestcompress.trace import graph_modules, is_neuron, trace_model


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # python control flow on a tensor value: untraceable
            return self.lin(x)
        return -x


class WithDataDependentChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.gate = DataDependent()
        self.lif = LIF()

    def forward(self, x):
        return self.lif(self.gate(self.pre(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.lif = LIF()
        self.scale = 0.5

    def forward(self, x):
        return self.lif(self.fc(x)) * self.scale

    def describe(self):
        return f"block scale {self.scale}"


class LoopOverTime(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.block = Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # [T, B, 4]
        outs = []
        for t in range(x.shape[0]):  # range over a traced size: untraceable
            outs.append(self.head(self.block(self.embed(x[t]).unsqueeze(0))[0]))
        return torch.stack(outs).mean(0), self.block.describe()


class OptionalArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, hook=None):
        y = self.fc(x)
        if hook is not None:
            y = hook(y)
        return y


def test_data_dependent_submodule_becomes_a_reported_leaf():
    torch.manual_seed(0)
    model = WithDataDependentChild()
    gm, report = trace_model(model)
    assert isinstance(gm, fx.GraphModule)
    assert [n for n, _ in report.leaves_added] == ["gate"]
    assert any("'gate' kept as an opaque leaf" in line for line in report.lines())
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert called == ["pre", "gate", "lif"]  # the leaf is called, the rest is traced
    x = torch.randn(2, 3, 4)
    assert torch.equal(gm(x), model(x)) and torch.equal(gm(-x.abs()), model(-x.abs()))


def test_untraceable_root_stays_eager_and_children_are_traced():
    torch.manual_seed(0)
    model = LoopOverTime()
    x = torch.randn(3, 2, 4)
    expected, _ = model(x)
    traced, report = trace_model(model)
    assert traced is model and not isinstance(traced, fx.GraphModule)
    assert [n for n, _ in report.eager] == [""]
    assert any("'<root>' runs eagerly" in line for line in report.lines())
    assert isinstance(traced.block, fx.GraphModule)  # the child with logic is traced ...
    assert [n for n, _ in graph_modules(traced)] == ["block"]
    assert type(traced.embed) is nn.Linear and type(traced.head) is nn.Linear  # ... leaves stay what they are
    out, text = traced(x)
    assert torch.equal(out, expected)
    assert text == "block scale 0.5"  # the traced child keeps its helper methods and attributes


def test_none_default_argument_is_fixed_and_placeholder_name_restored():
    model = OptionalArg()
    gm, report = trace_model(model)
    assert report.concrete_args == {"hook": None}
    assert any("'hook' fixed to None" in line for line in report.lines())
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "hook"]
    x = torch.randn(2, 4)
    assert torch.equal(gm(x, hook=None), model(x))


def test_spikingjelly_neurons_are_leaves():
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    model = nn.Sequential(nn.Linear(4, 4), neuron.LIFNode(step_mode="m"), nn.Linear(4, 2),
                          neuron.ParametricLIFNode(step_mode="m"))
    gm, report = trace_model(model)
    assert isinstance(gm, fx.GraphModule) and report.clean
    assert all(is_neuron(gm.get_submodule(t)) for t in ("1", "3"))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3"]


def test_snntorch_neurons_are_leaves():
    snn = pytest.importorskip("snntorch")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.lif = snn.Leaky(beta=0.9)

        def forward(self, x, mem):
            spk, mem = self.lif(self.fc(x), mem)
            return spk, mem

    gm, report = trace_model(Net())
    assert isinstance(gm, fx.GraphModule) and report.clean
    assert is_neuron(gm.lif) and [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc", "lif"]


def test_traced_module_keeps_plain_attributes_through_deepcopy():
    import copy
    model = Block()
    model.bc_spec = {"arch": "x"}
    gm, _ = trace_model(model)
    gm.bc_recipe = {"name": "r"}  # set after tracing, as binarize() does
    clone = copy.deepcopy(gm)
    assert type(clone).__name__ == "Block" and clone.describe() == "block scale 0.5"
    assert clone.bc_spec == {"arch": "x"} and clone.bc_recipe == {"name": "r"}
