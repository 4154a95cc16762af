"""onnxruntime's graph optimizations (a BatchNorm folded into its convolution, fused elementwise ops) round
differently from the graph's ops run as written; a model can amplify that far past a rounding tie (Meta-SpikeFormer:
BatchNorms of zero running variance multiply by 1/sqrt(eps), 0.078 % of one neuron's spikes flipped). The ONNX
verification then re-runs the graph with the optimizations off: when that matches PyTorch, the export is exact and
passes, saying how many spikes the optimized run flipped and why; when it does not, the export fails as before.

The optimized run's flips are simulated here (which fusions round across a threshold depends on the runtime's
version), by flipping spikes of one neuron in what the optimized runner returns: in a stepwise check the consumers
read PyTorch's spikes, so, as with the real fusions, only that neuron's spikes differ."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bestcompress.exporters import graph_check
from bestcompress.exporters.onnx import lower_to_standard
from bestcompress.exporters.qonnx import to_qonnx


@pytest.fixture(scope="module")
def exported(tiny_conv_binary):
    model = copy.deepcopy(tiny_conv_binary).eval()
    with torch.no_grad():  # one channel whose calibration input was constant: gain 1/sqrt(eps)
        model.get_submodule("bn2").running_var[3] = 0.0
    x = torch.rand((1,) + tuple(model.bc_input_shape), generator=torch.Generator().manual_seed(0))
    return model, lower_to_standard(to_qonnx(model, x))


def _flipping(real, neuron: str, when_optimized: bool, when_plain: bool):
    """ort_runner whose runs flip the first 3 spikes of `neuron` (optimized and/or plain runs)."""
    def runner(proto, spikes, stepwise=True, optimize=True):
        run = real(proto, spikes, stepwise, optimize)
        flip = when_optimized if optimize else when_plain

        def wrapped(x, feeds):
            outs, got = run(x, feeds)
            if flip and neuron in got:
                s = got[neuron].copy()
                flat = s.reshape(-1)
                flat[:3] = 1.0 - flat[:3]
                got = {**got, neuron: s}
            return outs, got
        return wrapped
    return runner


def test_flips_only_with_the_optimizations_on_pass_and_are_said(exported, monkeypatch):
    model, proto = exported
    plain = graph_check.verify_graph(proto, model, "onnxruntime", samples=4)
    assert plain.passed and plain.optimized_flips is None, plain.message()
    neuron = plain.neurons[-1].path
    monkeypatch.setattr(graph_check, "ort_runner", _flipping(graph_check.ort_runner, neuron, True, False))
    report = graph_check.verify_graph(proto, model, "onnxruntime", samples=4)
    assert report.passed, report.message()
    assert report.runtime == "onnxruntime, graph optimizations off" and report.flipped_fraction == 0
    assert report.optimized_flips and report.optimized_flips > 0
    msg = report.message()
    assert "with onnxruntime's graph optimizations on" in msg and "zero running variance" in msg and "'bn2'" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")
    d = report.to_dict()
    assert d["passed"] and d["optimized_flipped_fraction"] == report.optimized_flips


def test_flips_that_remain_with_the_optimizations_off_still_fail(exported, monkeypatch):
    model, proto = exported
    neuron = graph_check.verify_graph(proto, model, "onnxruntime", samples=4).neurons[-1].path
    monkeypatch.setattr(graph_check, "ort_runner", _flipping(graph_check.ort_runner, neuron, True, True))
    report = graph_check.verify_graph(proto, model, "onnxruntime", samples=4)
    assert not report.passed and report.runtime == "onnxruntime" and report.optimized_flips is None
    assert f"first diverges at neuron '{neuron}'" in report.message()


def test_a_wrong_output_is_not_retried(exported, monkeypatch):
    model, proto = exported
    calls = []
    real = graph_check.ort_runner

    def runner(proto, spikes, stepwise=True, optimize=True):
        calls.append(optimize)
        run = real(proto, spikes, stepwise, optimize)
        return lambda x, feeds: ([o + np.float32(1e-2) for o in run(x, feeds)[0]], run(x, feeds)[1])
    monkeypatch.setattr(graph_check, "ort_runner", runner)
    report = graph_check.verify_graph(proto, model, "onnxruntime", samples=4)
    assert not report.passed and calls == [True]  # the outputs differ: not a rounding question
