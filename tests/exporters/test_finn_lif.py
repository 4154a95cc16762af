"""The integer LIF membrane of the FINN-ready graph: a 1-bit layer -> BatchNorm -> LIF over T = 4, with biases and
negative scales, fires exactly PyTorch's spikes through integer-typed arithmetic."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from bestcompress.convert import binarize
from bestcompress.exporters.finn_lif import AffineSteps, full, integer_lif
from bestcompress.nn.attention import AttentionMapNeuron
from bestcompress.nn.lif import LIF

from .conftest import TinySpikingMLP

HAVE_QONNX = importlib.util.find_spec("qonnx") is not None and importlib.util.find_spec("finn") is not None


def _fire(z):
    return (z >= 0).float()


def _reference(neuron, x):
    with torch.no_grad():
        return neuron(x)


@pytest.mark.parametrize("neuron", [LIF(v_threshold=1.0), LIF(v_threshold=0.3), AttentionMapNeuron(4)])
def test_integer_membrane_fires_the_float_spikes(neuron):
    """x_t = α·A_t + β with integer A_t, per-channel α of both signs (and 0) and biases: equal spikes at T = 4."""
    g = torch.Generator().manual_seed(3)
    T, B, C = 4, 64, 12
    acc = torch.randint(-6, 7, (T, B, C), generator=g).float()
    if isinstance(neuron, AttentionMapNeuron):  # soft reset: V_th an integer multiple of α (the map neuron: α = 1)
        alpha = torch.tensor([1.0, -1.0, 0.5, -0.25] * 3)
    else:
        alpha = torch.randn(C, generator=g) * 0.4
        alpha[0] = 0.0
    beta = torch.randn(C, generator=g) * 0.5
    x = alpha * acc + beta
    aff = AffineSteps(list(acc), [full(alpha, a) for a in acc], [full(beta, a) for a in acc])
    spikes, how = integer_lif(neuron, aff, _fire)
    assert how == "integer"
    got = torch.stack(spikes, 0)
    ref = _reference(neuron, x)
    assert 0.1 < ref.mean() < 0.9  # the test means something: neurons fire and rest
    assert torch.equal(got, ref)


def test_neurons_without_an_integer_form_say_why():
    acc = [torch.ones(1, 3)] * 2
    aff = AffineSteps(acc, [full(0.3, a) for a in acc], [full(0.0, a) for a in acc])
    assert integer_lif(LIF(tau=3.0), aff, _fire) == (None, "tau = 3 (only tau = 2 is a shift)")
    assert integer_lif(LIF(v_reset=-1.0), aff, _fire)[0] is None
    assert integer_lif(AttentionMapNeuron(2), aff, _fire)[0] is None  # V_th / 0.3 is not an integer
    varying = AffineSteps(acc, [full(0.3, acc[0]), full(0.6, acc[1])], [full(0.0, a) for a in acc])
    assert integer_lif(LIF(), varying, _fire) == (None, "its input scale differs between time steps")


def _mlp_with_signed_bn():
    """TinySpikingMLP at T = 4, fc1 binary with a bias, bn1 with scales of both signs and biases (no ties)."""
    torch.manual_seed(0)
    binary = binarize(TinySpikingMLP(T=4).eval(), "bestformer", overrides={"reversible.enabled": False}).model
    bn = binary.bn1
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 20 + 5)
        bn.weight.copy_(torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0) * (torch.rand(n, generator=g) + 0.5))
        bn.bias.copy_(torch.rand(n, generator=g) * 1.5)
    return binary.eval()


@pytest.mark.skipif(not HAVE_QONNX, reason="qonnx / FINN+ are not installed")
def test_finn_ready_graph_integer_membrane_is_int_typed_and_spike_exact():
    from bestcompress.exporters.finn_ready import finn_ready_graph, finn_runner

    binary = _mlp_with_signed_bn()
    torch.manual_seed(2)
    x = torch.rand(6, 16)
    model, spikes, notes = finn_ready_graph(binary, x)
    assert "membranes: 1 of 2 LIF neuron(s) integer (finn_lif.py), 1 float" in notes  # lif0 reads a float fc0
    assert any(n.startswith("membranes: lif0 float: its input is not") for n in notes)
    recorded = {}
    hook = binary.lif1.register_forward_hook(lambda m, i, o: recorded.setdefault("s", o.detach().clone()))
    with torch.no_grad():
        binary(x)
    hook.remove()
    ref = recorded["s"].numpy()  # [T, B, C]
    assert 0.1 < ref.mean() < 0.9
    logits, got = finn_runner(model, spikes)(x.numpy(), {})
    assert np.array_equal(got["lif1"], ref)
    producers = {o: node for node in model.graph.node for o in node.output}
    for name in spikes["lif1"][0]:  # every tensor from fc1's accumulators to lif1's thresholds is integer-typed
        todo, seen = [producers[name].input[0]], set()
        while todo:
            t = todo.pop()
            if t in seen or model.get_initializer(t) is not None:
                continue
            seen.add(t)
            assert model.get_tensor_datatype(t).is_integer(), t
            node = producers[t]
            if node.op_type != "MatMul":
                todo.extend(node.input)
        assert len(seen) > 1


@pytest.mark.skipif(not HAVE_QONNX, reason="qonnx / FINN+ are not installed")
@pytest.mark.parametrize("values, allowed", [([-1.0, 0.0], "INT2"), ([-1.0, 1.0], "INT2"), ([0.0, 1.0], "BINARY"),
                                             ([-3.0, 2.0], "INT3"), ([-1.0, -1.0], "INT2")])
def test_integer_constants_get_a_datatype_that_holds_every_value(values, allowed):
    """A threshold step of {-1, 0} must not be typed BIPOLAR ({-1, +1}: get_smallest_possible(-1))."""
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.basic import qonnx_make_model

    from bestcompress.exporters.finn_lif import type_integer_constants

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    m = ModelWrapper(qonnx_make_model(helper.make_graph([helper.make_node("Mul", ["x", "c"], ["y"])], "g", [x], [y])))
    m.set_initializer("c", np.array([values], dtype=np.float32))
    m.set_tensor_datatype("x", DataType["INT8"])
    assert type_integer_constants(m) == 1
    dt = m.get_tensor_datatype("c")
    assert all(dt.allowed(v) for v in values) and dt.name == allowed
