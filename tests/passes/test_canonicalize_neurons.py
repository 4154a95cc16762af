"""CanonicalizeNeurons: third-party neurons become bestcompress neurons only when verified equal; every neuron
left in place is named in a note."""
from typing import NamedTuple

import pytest
import torch
from torch import nn

from bestcompress.nn.leaky import Leaky
from bestcompress.nn.lif import IF, LIF, ParametricLIF
from bestcompress.passes import CanonicalizeNeurons, PassContext
from bestcompress.passes.canonicalize_neurons import CANONICAL_NEURONS
from bestcompress.passes.neuron_check import deepcopy_module, verify_swap


def _apply(model):
    ctx = PassContext()
    p = CanonicalizeNeurons(ctx)
    out = p.apply(model)
    p.check(out)
    return out, p, ctx.notes


def _sj():
    return pytest.importorskip("spikingjelly.activation_based")


def test_spikingjelly_multi_step_neurons_are_replaced_with_their_settings():
    sj = _sj()
    from spikingjelly.activation_based import neuron, surrogate
    model = nn.Sequential(
        nn.Linear(8, 8), neuron.LIFNode(tau=3.0, v_threshold=0.5, v_reset=None, detach_reset=True, step_mode="m",
                                        decay_input=False),
        nn.Linear(8, 8), neuron.ParametricLIFNode(init_tau=4.0, step_mode="m"),
        nn.Linear(8, 8), neuron.IFNode(step_mode="m", surrogate_function=surrogate.ATan(alpha=3.0)))
    with torch.no_grad():
        model[3].w.fill_(-0.7)
    x = torch.randn(4, 2, 8)
    sj.functional.reset_net(model)
    expected = model(x)
    out, p, notes = _apply(model)
    lif, plif, if_ = out[1], out[3], out[5]
    assert type(lif) is LIF and type(plif) is ParametricLIF and type(if_) is IF
    assert (lif.tau, lif.v_threshold, lif.v_reset, lif.decay_input, lif.detach_reset) == (3.0, 0.5, None, False, True)
    assert plif.w.item() == pytest.approx(-0.7) and "w" in dict(plif.named_parameters())
    assert (if_.surrogate, if_.alpha) == ("atan", 3.0)
    assert torch.equal(out(x), expected)
    assert len(p.replaced) == 3 and not p.kept
    assert any("replaced" in n and "verified equal" in n for n in notes)
    assert any("reset_net" in n for n in notes)  # the state-between-calls difference is said


def test_spikingjelly_single_step_neurons_become_stateful_single_step_lif():
    sj = _sj()
    from spikingjelly.activation_based import functional, neuron

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.lif = neuron.LIFNode(tau=2.0, step_mode="s")

        def forward(self, x):  # [T, B, 6], one neuron call per step
            return torch.stack([self.lif(self.fc(x[t])) for t in range(x.shape[0])])

    model = Loop()
    x = torch.randn(5, 2, 6) * 2
    functional.reset_net(model)
    expected = model(x)
    out, p, _ = _apply(model)
    assert type(out.lif) is LIF and out.lif.step_mode == "s"
    functional.reset_net(out)  # spikingjelly's reset reaches the canonical neuron
    assert torch.equal(out(x), expected)
    functional.reset_net(out)
    assert torch.equal(out(x), expected)


def test_unsupported_surrogate_keeps_the_neuron_with_a_note():
    _sj()
    from spikingjelly.activation_based import neuron, surrogate
    model = nn.Sequential(nn.Linear(4, 4), neuron.LIFNode(step_mode="m", surrogate_function=surrogate.Erf()))
    out, p, notes = _apply(model)
    assert isinstance(out[1], neuron.LIFNode)
    assert "1" in p.kept and any("kept '1'" in n and "Erf" in n for n in notes)


def test_a_neuron_whose_dynamics_differ_is_kept_after_the_check():
    _sj()
    from spikingjelly.activation_based import neuron

    class HalvedInput(neuron.LIFNode):  # a subclass that looks like LIFNode but computes something else
        def multi_step_forward(self, x_seq, *args, **kwargs):
            return super().multi_step_forward(x_seq * 0.5)

    model = nn.Sequential(nn.Linear(4, 4), HalvedInput(step_mode="m"))
    out, p, notes = _apply(model)
    assert isinstance(out[1], HalvedInput)
    assert "spikes differ" in p.kept["1"] and any("kept '1'" in n for n in notes)


def test_shared_neuron_is_replaced_everywhere_by_one_module():
    _sj()
    from spikingjelly.activation_based import neuron
    shared = neuron.LIFNode(step_mode="m")
    model = nn.Module()
    model.a, model.b = shared, shared
    out, p, _ = _apply(model)
    assert isinstance(out.a, LIF) and out.a is out.b
    assert sorted(p.replaced) == ["a", "b"]


def test_snntorch_leaky_with_explicit_and_with_hidden_state_is_replaced():
    snn = pytest.importorskip("snntorch")
    from snntorch import surrogate

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 6)
            self.lif1 = snn.Leaky(beta=0.7, threshold=0.8, reset_mechanism="zero",
                                  spike_grad=surrogate.sigmoid(slope=10))
            self.fc2 = nn.Linear(6, 6)
            self.lif2 = snn.Leaky(beta=0.9, init_hidden=True)

        def forward(self, x):  # [T, B, 6]
            mem = self.lif1.init_leaky()
            self.lif2.reset_mem()
            out = []
            for t in range(x.shape[0]):
                s, mem = self.lif1(self.fc1(x[t]), mem)
                out.append(self.lif2(self.fc2(s)))
            return torch.stack(out)

    model = Net()
    x = torch.randn(5, 3, 6) * 2
    expected = model(x)
    out, p, notes = _apply(model)
    assert type(out.lif1) is Leaky
    assert (out.lif1.reset_mechanism, out.lif1.surrogate, out.lif1.alpha) == ("zero", "sigmoid", 10.0)
    assert type(out.lif2) is Leaky and out.lif2.init_hidden and not p.kept
    assert any("snntorch.utils.reset" in n and "reset_state" in n for n in notes)
    assert torch.equal(out(x), expected) and torch.equal(out(x), expected)  # its forward calls reset_mem()


def test_other_library_neurons_are_named_in_a_note():
    snn = pytest.importorskip("snntorch")
    model = nn.Sequential(nn.Linear(4, 4), snn.Synaptic(alpha=0.9, beta=0.8))
    out, p, notes = _apply(model)
    assert isinstance(out[1], snn.Synaptic)
    assert "no canonical form" in p.kept["1"] and any("kept '1'" in n for n in notes)


class _LegacyMultiStepLIFNode(nn.Module):
    """Stands in for spikingjelly 0.0.0.0.14's clock_driven MultiStepLIFNode (not installable beside 2.x)."""

    __module__ = "spikingjelly.clock_driven.neuron"

    def __init__(self, tau=2.0, v_threshold=1.0, v_reset=0.0, detach_reset=True, backend="torch"):
        super().__init__()
        from spikingjelly.activation_based import surrogate
        self.tau, self.v_threshold, self.v_reset, self.detach_reset = tau, v_threshold, v_reset, detach_reset
        self.decay_input, self.backend = True, backend
        self.surrogate_function = surrogate.Sigmoid()
        self.v = 0.0

    def reset(self):
        self.v = 0.0

    def forward(self, x_seq):
        if self.backend == "cupy":
            raise RuntimeError("cupy backend needs CUDA")
        out = []
        for x in x_seq:  # the 0.0.0.0.14 update order: charge, fire, hard reset
            self.v = self.v + (x - (self.v - self.v_reset)) / self.tau
            spike = self.surrogate_function(self.v - self.v_threshold)
            s = spike.detach() if self.detach_reset else spike
            self.v = (1.0 - s) * self.v + s * self.v_reset
            out.append(spike)
        return torch.stack(out)


_LegacyMultiStepLIFNode.__name__ = _LegacyMultiStepLIFNode.__qualname__ = "MultiStepLIFNode"


def test_legacy_clock_driven_multistep_lifnode_is_recognised_by_name():
    _sj()
    model = nn.Sequential(nn.Linear(4, 4), _LegacyMultiStepLIFNode(tau=2.0, v_threshold=0.8))
    x = torch.randn(4, 2, 4) * 2
    expected = model(x)
    out, p, _ = _apply(model)
    assert type(out[1]) is LIF and (out[1].tau, out[1].v_threshold) == (2.0, 0.8)
    assert p.replaced == {"1": "spikingjelly (legacy) MultiStepLIFNode"}
    assert torch.equal(out(x), expected)


def test_legacy_neuron_that_cannot_run_here_is_kept_with_a_note():
    _sj()
    model = nn.Sequential(nn.Linear(4, 4), _LegacyMultiStepLIFNode(backend="cupy"))
    out, p, notes = _apply(model)
    assert isinstance(out[1], _LegacyMultiStepLIFNode)
    assert "could not be run" in p.kept["1"]


def test_idempotent_and_canonical_neurons_untouched():
    _sj()
    from spikingjelly.activation_based import neuron
    model = nn.Sequential(nn.Linear(4, 4), neuron.LIFNode(step_mode="m"), nn.Linear(4, 4), LIF())
    once, _, _ = _apply(model)
    kinds = [type(m) for m in once.modules()]
    twice, p, notes = _apply(once)
    assert [type(m) for m in twice.modules()] == kinds
    assert not p.replaced and not p.kept and notes == []
    assert all(isinstance(m, CANONICAL_NEURONS) for m in (twice[1], twice[3]))


def test_verify_swap_leaves_both_neurons_untouched_and_deepcopy_survives_autograd_state():
    _sj()
    from spikingjelly.activation_based import neuron
    old = neuron.LIFNode(step_mode="m")
    old(torch.randn(3, 2, 4, requires_grad=True))  # leaves a non-leaf membrane behind
    v_before = old.v.clone()
    assert verify_swap(old, LIF(detach_reset=False)) is None
    assert torch.equal(old.v, v_before)
    assert "differ" in verify_swap(old, LIF(tau=3.0, detach_reset=False))
    copy = deepcopy_module(nn.Sequential(old))  # plain copy.deepcopy raises on the non-leaf state
    assert torch.equal(copy[0].v, v_before) and copy[0].v.grad_fn is None


def test_norse_neurons_are_named_in_a_note():
    class LSNNCell(nn.Module):  # a norse neuron without a canonical form (no parameter tuple bestcompress reads)
        __module__ = "norse.torch.module.lsnn"

        def forward(self, x, state=None):
            return x, state

    model = nn.Sequential(nn.Linear(4, 4), LSNNCell())
    out, p, notes = _apply(model)
    assert isinstance(out[1], LSNNCell) and "no canonical form" in p.kept["1"]
    assert any("kept '1'" in n and "norse" in n for n in notes)


def test_snntorch_init_hidden_model_binarizes_distills_a_step_and_exports_verified(tmp_path):
    pytest.importorskip("snntorch")
    import copy

    import bestcompress as bc
    from bestcompress.convert import binarize
    from bestcompress.data import load_dataset
    from bestcompress.nn.binary import is_binary_layer
    from bestcompress.training.trainer import distill
    from tests.thirdparty_models import SnnTorchHiddenNet

    torch.manual_seed(0)
    teacher = SnnTorchHiddenNet().eval()
    x = torch.rand(2, 8) * 3
    result = binarize(copy.deepcopy(teacher), "bestformer", example_input=x, overrides={"reversible.enabled": False})
    student = result.model
    leaky = [m for m in student.modules() if isinstance(m, Leaky)]
    assert len(leaky) == 2 and all(m.init_hidden for m in leaky)  # canonicalised, not kept
    assert not any("kept" in n and "CanonicalizeNeurons" in n for n in result.notes)
    assert any(is_binary_layer(m) for m in student.modules())
    data = load_dataset("synthetic", input_shape=(8,), num_classes=3, subset=16)
    before = [p.detach().clone() for p in student.parameters()]
    distill(student, teacher, data, epochs=1, limit_batches=1, log=lambda *a: None,
            overrides={"train.batch_size": 8, "train.calibrate_batches": 0})
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert bc.export(student.eval(), "qonnx", tmp_path / "m.onnx", example_input=x).stat().st_size > 0


# norse's LIFBoxCell, written here after norse's documented equations (norse is not installed here): parameters
# in a `p` tuple, `z, state = cell(x, state)`, state None at the first step, strict heaviside, SuperSpike backward.
class _SuperSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.gt(x, 0.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / (torch.abs(x) + 1.0).pow(2)


def reset_value(z, v, reset, th):
    return (1 - z) * v + z * reset


def reset_subtract(z, v, reset, th):
    return (1 - z) * v + z * (v - th)


class LIFBoxParameters(NamedTuple):
    tau_mem_inv: torch.Tensor = torch.as_tensor(100.0)
    v_leak: torch.Tensor = torch.as_tensor(0.0)
    v_th: torch.Tensor = torch.as_tensor(1.0)
    v_reset: torch.Tensor = torch.as_tensor(0.0)
    method: str = "super"
    alpha: torch.Tensor = torch.as_tensor(100.0)
    reset_method: object = reset_value


class LIFBoxFeedForwardState(NamedTuple):
    v: torch.Tensor


class LIFBoxCell(nn.Module):
    __module__ = "norse.torch.module.lif_box"

    def __init__(self, p=LIFBoxParameters(), dt=0.001):
        super().__init__()
        self.p, self.dt = p, dt

    def forward(self, input_tensor, state=None):
        p = self.p
        v = p.v_leak.clone() if state is None else state.v
        v = v + self.dt * p.tau_mem_inv * (input_tensor + p.v_leak - v)
        z = _SuperSpike.apply(v - p.v_th) if p.method == "super" else torch.gt(v - p.v_th, 0.0).to(v.dtype)
        return z, LIFBoxFeedForwardState(p.reset_method(z, v, p.v_reset, p.v_th))


class _NorseBoxNet(nn.Module):
    def __init__(self, T=5):
        super().__init__()
        self.T = T
        self.input_shape = (6,)
        self.fc, self.fc2, self.head = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 3)
        self.cell = LIFBoxCell(LIFBoxParameters(tau_mem_inv=torch.as_tensor(200.0), v_th=torch.as_tensor(0.75)))
        self.cell2 = LIFBoxCell(LIFBoxParameters(reset_method=reset_subtract))

    def forward(self, x):
        s1 = s2 = None
        out = 0
        for _ in range(self.T):
            z, s1 = self.cell(self.fc(x) * 10, s1)
            z, s2 = self.cell2(self.fc2(z) * 10 + 3, s2)
            out = out + self.head(z)
        return out / self.T


def test_norse_lif_box_cells_become_box_lif_cells_and_the_model_exports_verified(tmp_path):
    import copy

    import bestcompress as bc
    from bestcompress.convert import binarize
    from bestcompress.data import load_dataset
    from bestcompress.nn.norse_lif import BoxLIFCell
    from bestcompress.training.trainer import distill

    torch.manual_seed(0)
    teacher = _NorseBoxNet().eval()
    x = torch.rand(4, 6)
    out, p, notes = _apply(copy.deepcopy(teacher))
    assert p.replaced == {"cell": "norse LIFBoxCell", "cell2": "norse LIFBoxCell"} and not p.kept
    assert (out.cell.tau_mem_inv, out.cell.v_th, out.cell2.reset_mode) == (200.0, 0.75, "subtract")
    with torch.no_grad():
        want = teacher(x)
        assert torch.equal(out(x), want) and not torch.allclose(want, teacher.head.bias.expand_as(want))  # it fires
    wrong = LIFBoxCell(LIFBoxParameters(method="triangle"))
    assert "threshold method 'triangle'" in _apply(nn.Sequential(nn.Linear(2, 2), wrong))[1].kept["1"]
    result = binarize(copy.deepcopy(teacher), "bestformer", example_input=x, overrides={"reversible.enabled": False})
    assert sum(isinstance(m, BoxLIFCell) for m in result.model.modules()) == 2
    data = load_dataset("synthetic", input_shape=(6,), num_classes=3, subset=16)
    distill(result.model, teacher, data, epochs=1, limit_batches=1, log=lambda *a: None,
            overrides={"train.batch_size": 8, "train.calibrate_batches": 0})
    assert bc.export(result.model.eval(), "qonnx", tmp_path / "m.onnx", example_input=x).stat().st_size > 0
