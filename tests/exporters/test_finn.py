"""FINN+ front-end: a tiny binary spiking model converts, executes equal to PyTorch, and is reported node by node."""
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
    assert files == ["model_finn.onnx", "model_hw.onnx", "model_qonnx.onnx", "model_streamlined.onnx",
                     "report.json", "report.txt"]
    report = json.loads((out / "report.json").read_text())
    hw = onnx.load(str(out / "model_hw.onnx"))
    assert [r["node"] for r in report["nodes"]] == [n.name for n in hw.graph.node]  # every node is listed
    text = (out / "report.txt").read_text()
    assert all(n.name in text for n in hw.graph.node)
    t = report["totals"]
    assert t["nodes"] == len(hw.graph.node) == t["hw"] + t["not_mapped"]
    assert t["hw"] > 0 and sum(t["by_layer"].values()) == t["hw"] and sum(t["by_reason"].values()) == t["not_mapped"]
    assert all(r["layer"] for r in report["nodes"] if r["hw"]) and all(r["reason"] for r in report["nodes"] if not r["hw"])
    assert any("LIF" in reason for reason in t["by_reason"])  # the membrane recurrence is reported honestly
    assert report["verification"]["qonnx"]["passed"] and report["verification"]["finn"]["passed"]
    from bestcompress.exporters import verify_file
    assert verify_file(out, tiny_mlp_binary).passed


def test_without_finn_a_clear_error(tmp_path, tiny_mlp_binary, monkeypatch):
    for name in [m for m in sys.modules if m == "finn" or m.startswith("finn.")] + ["finn"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ExportError, match="pip install --no-deps finn-plus==1.6.1"):
        export_model(tiny_mlp_binary, "finn", tmp_path / "finn")
    assert list(tmp_path.iterdir()) == []
