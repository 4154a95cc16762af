"""FINN+ front-end: a tiny binary spiking model's FINN-ready graph reaches MVAU hardware layers, executes equal to
PyTorch at every stage, and is reported node by node."""
from __future__ import annotations

import importlib.util
import json
import sys

import onnx
import pytest

from bestcompress.errors import ExportError
from bestcompress.exporters import export_model

HAVE_FINN = importlib.util.find_spec("finn") is not None


@pytest.mark.skipif(not HAVE_FINN, reason="FINN+ (the [finn] extra) is not installed")
def test_tiny_model_converts_executes_and_is_reported(tmp_path, tiny_mlp_binary):
    out = tmp_path / "finn"
    result = export_model(tiny_mlp_binary, "finn", out, batch_size=2)
    assert result.verification.passed and result.verification.max_abs_diff <= 1e-4
    files = sorted(p.name for p in out.iterdir())
    assert files == ["folding_config.json", "model_finn.onnx", "model_hw.onnx", "model_qonnx.onnx",
                     "model_streamlined.onnx", "report.json", "report.txt"]
    report = json.loads((out / "report.json").read_text())
    hw = onnx.load(str(out / "model_hw.onnx"))
    assert [r["node"] for r in report["nodes"]] == [n.name for n in hw.graph.node]  # every node is listed
    text = (out / "report.txt").read_text()
    assert all(n.name in text for n in hw.graph.node)
    t = report["totals"]
    assert t["nodes"] == len(hw.graph.node) == t["hw"] + t["not_mapped"]
    assert t["hw"] > 0 and sum(t["by_layer"].values()) == t["hw"] and sum(t["by_reason"].values()) == t["not_mapped"]
    assert all(r["layer"] for r in report["nodes"] if r["hw"]) and all(r["reason"] for r in report["nodes"] if not r["hw"])
    assert report["finn_ready"] and report["nodes_total"] == t["nodes"] and report["nodes_hw"] == t["hw"]
    # fc1 (the one 1-bit layer) runs once per time step: each step's MatMul became an MVAU with BINARY input
    mvau = [n for n in hw.graph.node if n.op_type == "MVAU"]
    assert len(mvau) == tiny_mlp_binary.T and report["binary_mac_fraction_in_hw"] == 1.0
    assert all(dict((a.name, a.s) for a in n.attribute)["inputDataType"] == b"BINARY" for n in mvau)
    assert t["binary_macs"] == tiny_mlp_binary.T * 32 * 32  # one 32 -> 32 product per step (batch 1)
    assert "Thresholding" in t["by_layer"]  # the LIF spikes are hardware thresholds
    for stage in ("qonnx", "finn", "streamlined", "hw"):
        assert report["verification"][stage]["passed"], stage
    for stage in ("finn", "streamlined", "hw"):  # both neurons' spikes (every step) compared at every stage
        assert len(report["verification"][stage]["neurons"]) == 2, stage
    assert t["estimates"]["slowest_layer_cycles"] > 0  # FINN's own cycle estimates, one per hardware layer
    assert all(r["cycles"] > 0 for r in report["nodes"] if r["op_type"] == "MVAU")
    folding = json.loads((out / "folding_config.json").read_text())
    assert all(folding[n.name]["PE"] == 1 and folding[n.name]["SIMD"] == 1 for n in mvau)
    from bestcompress.exporters import verify_file
    assert verify_file(out, tiny_mlp_binary).passed


def test_without_finn_a_clear_error(tmp_path, tiny_mlp_binary, monkeypatch):
    for name in [m for m in sys.modules if m == "finn" or m.startswith("finn.")] + ["finn"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ExportError, match="pip install --no-deps finn-plus==1.6.1"):
        export_model(tiny_mlp_binary, "finn", tmp_path / "finn")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAVE_FINN, reason="FINN+ (the [finn] extra) is not installed")
def test_binary_convolutions_before_and_after_maxpool_become_mvaus(tmp_path, tiny_conv_binary):
    """The exporter folds each BatchNorm into its 1-bit convolution (weights ±m_c); the FINN-ready graph splits
    the scale off again, so both binary convolutions (the second reads MaxPool's output) are BINARY × BIPOLAR
    MVAUs, once per time step, and the graph still executes equal to PyTorch at every stage."""
    lines: list[str] = []
    result = export_model(tiny_conv_binary, "finn", tmp_path / "finn", samples=2, progress=lines.append)
    assert result.verification.passed
    report = json.loads((tmp_path / "finn" / "report.json").read_text())
    hw = onnx.load(str(tmp_path / "finn" / "model_hw.onnx"))
    mvau = [n for n in hw.graph.node if n.op_type == "MVAU"]
    assert len(mvau) == 2 * tiny_conv_binary.T and report["binary_mac_fraction_in_hw"] == 1.0
    assert all(dict((a.name, a.s) for a in n.attribute)["inputDataType"] == b"BINARY" for n in mvau)
    assert report["totals"]["by_layer"].get("Pool", 0) == tiny_conv_binary.T  # the MaxPool is a hardware layer
    for stage in ("finn", "streamlined", "hw"):
        assert report["verification"][stage]["passed"], stage
    steps = [line for line in lines if line.startswith("FINN+: ") and line.endswith(" nodes)")]
    assert any("Streamline[0] ConvertSubToAdd" in line for line in steps) and len(steps) > 40  # one per transform


@pytest.mark.skipif(not HAVE_FINN, reason="FINN+ (the [finn] extra) is not installed")
def test_a_failing_stage_check_raises_unless_not_strict(tmp_path, tiny_mlp_binary, monkeypatch):
    import torch

    from bestcompress.exporters import finn

    real = finn._check_stage

    def wrong_streamlined(model, graph, spikes, x, kind, tolerance, stage):
        rep = real(model, graph, spikes, x, kind, tolerance, stage)
        if stage == "streamlined":
            rep.max_abs_diff = 1.0  # as if Streamline had changed the outputs
        return rep
    monkeypatch.setattr(finn, "_check_stage", wrong_streamlined)
    x = torch.rand((1,) + tuple(tiny_mlp_binary.bc_input_shape))
    with pytest.raises(ExportError, match="streamlined graph"):
        finn.export_finn(tiny_mlp_binary, x, tmp_path / "strict")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    out, report, _ = finn.export_finn(tiny_mlp_binary, x, tmp_path / "lenient", strict=False)
    assert not report["verification"]["streamlined"]["passed"] and report["verification"]["hw"]["passed"]
    assert any(n.startswith("verification failed (not strict)") and "streamlined" in n for n in report["notes"])
    assert json.loads((out / "report.json").read_text())["verification"]["streamlined"]["passed"] is False
