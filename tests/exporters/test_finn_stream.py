"""Quantized coupled streams (recipe bestformer_finn, reversible.stream_bits 8) through the exporters: QONNX and
ONNX verify, and in the FINN-ready graph every stream is MultiThreshold(INT8) -> Mul(2^e), so after Streamline
(SplitStreamScale: one Mul per reader) every 1-bit layer, those reading the streams included, is an MVAU."""
from __future__ import annotations

import importlib.util
import json

import onnx
import pytest
import torch

from bestcompress.convert import binarize
from bestcompress.exporters import export_all, export_model
from bestcompress.nn.calibrate import make_it_fire
from bestcompress.nn.reversible import ReversibleCoupling
from bestcompress.nn.stream_quant import stream_quants
from bestcompress.zoo import create_model, get_entry

HAVE_FINN = importlib.util.find_spec("finn") is not None


@pytest.fixture(scope="module")
def quantized_seq():
    """spikformer_seq tiny made smaller (2 blocks: 3 couplings; T = 1, 8 tokens, width 16: ~10 CPU s of FINN),
    a_k, b_k moved off (0, 1) so that the float stream would not be an integer, its grids calibrated."""
    torch.manual_seed(0)
    cfg = dict(get_entry("spikformer_seq").tiny_cfg, depths=2, T=1, seq_len=8, embed_dims=16)
    source = create_model("spikformer_seq", **cfg).eval()
    binary = binarize(source, "bestformer_finn").model
    for i, c in enumerate(m for m in binary.modules() if isinstance(m, ReversibleCoupling)):
        with torch.no_grad():
            c.a.fill_(0.21 + 0.1 * i)
            c.b.fill_(0.83 - 0.05 * i)
    make_it_fire(binary, binary.bc_input_shape, batches=2)
    assert len(stream_quants(binary)) == 3 and all(bool(q.calibrated) for q in stream_quants(binary))
    return binary


def test_qonnx_and_onnx_exports_verify(tmp_path, quantized_seq):
    results = export_all(quantized_seq, {"qonnx": tmp_path / "m.onnx", "onnx": tmp_path / "m.std.onnx"})
    for fmt, r in results.items():
        assert r.verification.passed and r.verification.max_abs_diff <= 1e-4, (fmt, r.verification.message())


@pytest.mark.skipif(not HAVE_FINN, reason="FINN+ (the [finn] extra) is not installed")
def test_every_1bit_layer_reaches_an_mvau_with_int8_stream_inputs(tmp_path, quantized_seq):
    out = tmp_path / "finn"
    result = export_model(quantized_seq, "finn", out, samples=2)
    assert result.verification.passed
    ready = onnx.load(str(out / "model_finn.onnx"))
    producers = {o: n for n in ready.graph.node for o in n.output}
    ints = [n for n in ready.graph.node if n.op_type == "MultiThreshold"
            and any(a.name == "out_dtype" and a.s == b"INT8" for a in n.attribute)]
    assert len(ints) == 3 * quantized_seq.T  # one per coupling and time step
    muls = [n for n in ready.graph.node if n.op_type == "Mul" and producers.get(n.input[0]) in ints]
    assert len(muls) >= len(ints)  # each followed by its power-of-two Mul
    report = json.loads((out / "report.json").read_text())
    for stage in ("qonnx", "finn", "streamlined", "hw"):
        assert report["verification"][stage]["passed"], stage
    assert report["binary_mac_fraction_in_hw"] == 1.0
    assert report["totals"]["binary_weight_layers"]["not_mapped"] == 0
    hw = onnx.load(str(out / "model_hw.onnx"))
    in_types = [dict((a.name, a.s) for a in n.attribute)["inputDataType"] for n in hw.graph.node
                if n.op_type == "MVAU"]
    assert b"INT8" in in_types  # block 1's q/k/v and fc1 read the 8-bit stream


@pytest.mark.skipif(importlib.util.find_spec("qonnx") is None, reason="qonnx is not installed")
def test_finn_ready_graph_names_every_neurons_spikes_beside_the_int8_streams(quantized_seq):
    from bestcompress.exporters.finn_ready import finn_ready_graph
    from bestcompress.nn.lif import LIF
    from bestcompress.nn.stream_quant import finn_lowering

    x = torch.rand((1,) + tuple(quantized_seq.bc_input_shape))
    with finn_lowering():
        m, spikes, notes = finn_ready_graph(quantized_seq, x)
    neurons = {n for n, mod in quantized_seq.named_modules() if isinstance(mod, LIF)}
    assert neurons and set(spikes) == neurons, notes
    present = {n.output[0]: n for n in m.graph.node}
    for key, (steps, _) in spikes.items():
        assert len(steps) == quantized_seq.T
        for name in steps:
            attrs = {a.name: a.s for a in present[name].attribute}
            assert present[name].op_type == "MultiThreshold" and attrs["out_dtype"] == b"BINARY", name
    ints = [n for n in m.graph.node if n.op_type == "MultiThreshold" and n.output[0] not in
            {s for steps, _ in spikes.values() for s in steps}]
    assert len(ints) == 3 * quantized_seq.T  # the streams' INT8 MultiThresholds are not named as spikes
    assert not any("could not be matched" in n for n in notes)
