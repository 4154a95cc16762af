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


# ------------------------------------------------------------------ models written in the style of public code

class BNAndPad(nn.Module):
    """Pads a BatchNorm output with the values BN maps zero to, by slice assignment (untraceable under fx)."""

    def __init__(self, pad: int, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x):
        out = self.bn(x)
        pad_values = (self.bn.bias - self.bn.running_mean * self.bn.weight
                      / torch.sqrt(self.bn.running_var + self.bn.eps)).detach()
        out = nn.functional.pad(out, [self.pad] * 4)
        pad_values = pad_values.view(1, -1, 1, 1)
        out[:, :, 0:self.pad, :] = pad_values
        out[:, :, -self.pad:, :] = pad_values
        return out


class ManyPads(nn.Module):
    """40 untraceable submodules: more than any fixed retry cap of 32."""

    def __init__(self, n: int = 40):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 3) for _ in range(n))
        self.pads = nn.ModuleList(BNAndPad(1, 2) for _ in range(n))
        self.lif = LIF()

    def forward(self, x):
        for conv, pad in zip(self.convs, self.pads):
            x = conv(pad(x))
        return self.lif(x.unsqueeze(0))[0]


def test_more_than_32_untraceable_submodules_all_become_leaves_and_the_root_is_traced():
    torch.manual_seed(0)
    model = ManyPads().eval()
    x = torch.randn(2, 2, 6, 6)
    with pytest.raises(Exception):
        fx.symbolic_trace(model.pads[0])  # slice assignment: plain fx cannot trace it
    gm, report = trace_model(model)
    assert isinstance(gm, fx.GraphModule) and not report.eager
    assert sorted(n for n, _ in report.leaves_added) == sorted(f"pads.{i}" for i in range(40))
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


class ShapeBranches(nn.Module):
    """Spike-driven-Transformer style: the forward branches on the input's rank and loops over its time axis."""

    def __init__(self, T: int = 3):
        super().__init__()
        self.T = T
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.lif = LIF()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        if len(x.shape) < 5:  # a static image: repeat it over T steps
            x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        if x.ndim != 5:
            raise ValueError("expected [T, B, C, H, W]")
        T, B = x.shape[0], x.shape[1]
        y = self.lif(self.conv(x.flatten(0, 1)).reshape(T, B, 4, *x.shape[3:]))
        outs = [self.head(y[t].mean((2, 3))) for t in range(x.shape[0])]
        return torch.stack(outs).mean(0)


def test_shape_branches_are_specialised_on_the_example_input_and_reported():
    torch.manual_seed(0)
    model = ShapeBranches()
    x = torch.rand(2, 2, 5, 5)
    plain, plain_report = trace_model(ShapeBranches())
    assert plain_report.eager  # without an example input the branches stay untraceable
    gm, report = trace_model(model, example_input=x)
    assert isinstance(gm, fx.GraphModule) and report.clean
    lines = "\n".join(report.lines())
    assert "len(getattr) = 4" in lines and "bool(ne) = False" in lines and "index(getitem) = 3" in lines
    for batch in (2, 5):  # the batch size stays free: only the branches were specialised
        xb = torch.rand(batch, 2, 5, 5)
        assert torch.equal(gm(xb), model(xb))


def test_a_branch_on_a_tensor_value_is_not_specialised():
    model = WithDataDependentChild()
    gm, report = trace_model(model, example_input=torch.randn(2, 3, 4))
    assert [n for n, _ in report.leaves_added] == ["gate"] and not report.specialised


def test_a_forward_unrolled_over_time_marks_each_steps_nodes():
    from bestcompress.trace import annotate_time_steps

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.lif = LIF(step_mode="s")

        def forward(self, x):
            h, out = self.pre(x), 0
            for _ in range(3):
                out = out + self.lif(self.fc(h))
            return self.head(out)

    gm, _ = trace_model(Loop())
    assert gm.bc_time_steps == 3 and annotate_time_steps(gm) == 3
    by_target = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            by_target.setdefault(n.target, []).append(n.meta.get("bc_time_step"))
    assert by_target == {"pre": [None], "fc": [0, 1, 2], "lif": [0, 1, 2], "head": [None]}
