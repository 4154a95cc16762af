"""The FINN-ready graph: time steps unrolled per stream, spikes as BINARY MultiThresholds, ±1 weights BIPOLAR."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from bestcompress.exporters.finn_unroll import Scaled, Steps, StepInterpreter, UnrolledModel, UnrollLog
from bestcompress.exporters.verify import logits_of
from bestcompress.model_facts import model_time_steps

HAVE_QONNX = importlib.util.find_spec("qonnx") is not None


def _logits(model, x):
    with torch.no_grad():
        return logits_of(model(x))


@pytest.mark.parametrize("name", ["spikformer_seq", "spikformer_cifar"])
def test_unrolled_model_equals_pytorch_with_no_fallback(binary_models, name):
    binary, _ = binary_models(name)
    torch.manual_seed(1)
    x = torch.rand((2,) + tuple(binary.bc_input_shape))
    unrolled = UnrolledModel(binary, model_time_steps(binary)).eval()
    got = _logits(unrolled, x)
    assert torch.equal(got, _logits(binary, x))  # the same float ops per step: bit-identical logits
    assert unrolled.log.fallbacks == []  # nothing ran on a T·B-merged or stacked tensor
    neurons = [n for n, m in binary.named_modules() if type(m).__name__ in ("LIF", "AttentionMapNeuron")]
    assert len({k for k, _, _ in unrolled.log.spikes}) == len(neurons)
    assert len(unrolled.log.spikes) == len(neurons) * model_time_steps(binary)


def test_steps_track_time_first_and_merged_shapes():
    a, b = torch.zeros(1, 3, 5), torch.ones(1, 3, 5)
    assert Steps([a, b], "tf").fake_shape() == (2, 1, 3, 5)
    assert Steps([a, b], "tb").fake_shape() == (2, 3, 5)
    assert torch.equal(Steps([a, b], "tb").stacked(), torch.cat([a, b], 0))
    assert torch.equal(Scaled(Steps([b, b], "tf"), 0.125).value()[1], b * 0.125)


def test_unknown_time_op_falls_back_to_the_stacked_tensor_and_is_logged():
    class CumulativeOverTime(torch.nn.Module):  # cumsum over T cannot be split per step
        T = 2

        def forward(self, x):
            return x.unsqueeze(0).repeat(2, 1, 1).cumsum(0).flatten(0, 1).sum(1)

    gm = torch.fx.symbolic_trace(CumulativeOverTime())
    x = torch.rand(1, 4)
    log = UnrollLog()
    out = StepInterpreter(gm, 2, log, {}).run(x)
    out = out.stacked() if isinstance(out, Steps) else out
    assert torch.equal(out, gm(x)) and any("cumsum" in f for f in log.fallbacks)


@pytest.mark.skipif(not HAVE_QONNX, reason="qonnx is not installed")
def test_finn_ready_graph_is_binary_bipolar_and_executes_equal(binary_models):
    from qonnx.core.onnx_exec import execute_onnx

    from bestcompress.exporters.finn_ready import SPIKE_PREFIX, finn_ready_graph

    binary, _ = binary_models("spikformer_seq")
    x = torch.rand((1,) + tuple(binary.bc_input_shape))
    model, spikes, notes = finn_ready_graph(binary, x)
    assert [n for n in notes if not n.startswith("membranes:")] == []  # (finn_lif.py says which are integer)
    ops = [n.op_type for n in model.graph.node]
    assert "BipolarQuant" not in ops and ops.count("MultiThreshold") == sum(len(v[0]) for v in spikes.values())
    for node in model.graph.node:
        if node.op_type == "MultiThreshold":
            assert node.output[0].startswith(SPIKE_PREFIX)
            assert model.get_tensor_datatype(node.output[0]).name == "BINARY"
    binary_layers = [n for n, m in binary.named_modules() if type(m).__name__.startswith("Binary")]
    bipolar = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Conv")
               and model.get_tensor_datatype(n.input[1]).name == "BIPOLAR"}
    assert len(bipolar) == len(binary_layers) * model_time_steps(binary) or len(bipolar) == len(binary_layers)
    assert all(model.get_tensor_shape(n.input[0])[0] == 1 for n in model.graph.node if n.op_type == "Conv")
    ctx = execute_onnx(model, {model.graph.input[0].name: x.numpy()}, return_full_exec_context=True)
    ref = _logits(binary, x).numpy()
    assert np.abs(ctx[model.graph.output[0].name] - ref).max() <= 1e-5
    for key, (names, kind) in spikes.items():
        assert all(set(np.unique(ctx[n])) <= {0.0, 1.0} for n in names)
