"""The comparison library and the dispatcher: ties, NaN/Inf, unknown custom-op domains, tuple/dict outputs,
progress lines, one traced graph for several formats."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.errors import ExportError
from bestcompress.exporters import export_all, export_model, verify_file
from bestcompress.exporters.graph_check import check_domains
from bestcompress.exporters.verify import compare, torch_forward
from bestcompress.nn.calibrate import make_it_fire
from bestcompress.nn.lif import LIF

from .conftest import TinySpikingMLP


class OneNeuron(nn.Module):
    """x [B, T, F] -> LIF (hard reset, time-first) -> mean over T."""

    def __init__(self) -> None:
        super().__init__()
        self.lif = LIF()

    def forward(self, x):
        return self.lif(x.transpose(0, 1)).mean(0)


def _graph_returning(model, change):
    """A fake runner: PyTorch's own spikes and outputs, with `change(spikes)` applied to the spikes."""
    def run(x, feeds):
        out, spikes, _ = torch_forward(model, x, ["lif"])
        spikes = {p: change(s.copy()) for p, s in spikes.items()}
        return out, spikes
    return run


def test_a_tie_flip_is_excused_with_its_later_steps_and_a_real_flip_is_not():
    model = OneNeuron().eval()
    # element 0: H = 1.0 at t=0 (exactly V_th: a tie), fires and resets, H = 0.5 at t=1 (no tie, no spike);
    # element 1: H = 0.25, 0.375 (far from V_th); element 2: H = 1.5, 1.5
    x = np.array([[[2.0, 0.5, 3.0], [1.0, 0.5, 3.0]]], np.float32)

    def flip_tie(s):  # the "graph" does not fire at the tie, so it keeps H = 1 and fires at t=1 instead
        s[0, 0, 0] = 0.0
        s[1, 0, 0] = 1.0
        return s
    report = compare(model, _graph_returning(model, flip_tie), x, 1, ["lif"], "fake", stepwise=True)
    assert report.passed and report.ties == 2 and report.neurons[0].flipped == 0, report.message()
    assert "rounding ties" in report.message()

    def flip_real(s):  # element 1 is far from V_th (H = 0.25)
        s[0, 0, 1] = 1.0
        return s
    report = compare(model, _graph_returning(model, flip_real), x, 1, ["lif"], "fake", stepwise=True)
    assert not report.passed and report.neurons[0].flipped == 1 and "first diverges at neuron 'lif'" in \
        report.message()
    # without the stepwise feed there is no tie information: every differing spike counts
    report = compare(model, _graph_returning(model, flip_tie), x, 1, ["lif"], "fake", stepwise=False)
    assert not report.passed and report.neurons[0].flipped == 2


def test_nan_or_inf_outputs_never_pass(tmp_path, tiny_mlp_binary):
    model = tiny_mlp_binary
    x = np.random.default_rng(0).random((2, 16), dtype=np.float32)

    def nan_graph(xb, feeds):
        out, spikes, _ = torch_forward(model, xb, [])
        out[0][0, 0] = np.nan
        return out, {}
    report = compare(model, nan_graph, x, 2, [], "fake")
    assert not report.passed and report.non_finite == 1 and report.max_abs_diff == 0.0
    assert "NaN or infinite" in report.message() and "graph's" in report.message()

    broken = make_it_fire(binarize(TinySpikingMLP().eval(), "bestformer",
                                   overrides={"reversible.enabled": False}).model, (16,))
    with torch.no_grad():
        broken.get_submodule("head").bias[1] = float("inf")  # PyTorch itself is non-finite: same in the graph
    for fmt in ("qonnx", "onnx"):
        with pytest.raises(ExportError, match="NaN or infinite") as e:
            export_model(broken, fmt, tmp_path / f"m_{fmt}.onnx", batch_size=2)
        assert str(e.value).count(". ") == 0
    assert list(tmp_path.iterdir()) == []


def test_unknown_custom_op_domain_is_refused_before_anything_runs(tmp_path, tiny_mlp_binary, monkeypatch):
    good = tmp_path / "m.onnx"
    export_model(tiny_mlp_binary, "qonnx", good, batch_size=2)
    marker = tmp_path / "ran"
    (tmp_path / "bc_evil_domain.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    proto = onnx.load(str(good))
    node = next(n for n in proto.graph.node if n.op_type == "BipolarQuant")
    node.domain = "bc_evil_domain"
    bad = tmp_path / "evil.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ExportError, match="custom-op domain 'bc_evil_domain'") as e:
        verify_file(bad, tiny_mlp_binary)
    assert str(e.value).count(". ") == 0
    assert not marker.exists()
    # the premise: qonnx's executor would have imported (and so run) the module the domain names
    from qonnx.custom_op.registry import getCustomOp
    with pytest.raises(Exception):
        getCustomOp(node)
    assert marker.exists()
    check_domains(onnx.load(str(good)), "the graph")  # bestcompress's own QONNX graphs pass


class TupleOut(TinySpikingMLP):
    def forward(self, x):
        return super().forward(x), None


class DictOut(TinySpikingMLP):
    def forward(self, x):
        logits = super().forward(x)
        return {"aux": logits * 2, "logits": logits}


@pytest.mark.parametrize("cls", [TupleOut, DictOut])
def test_tuple_and_dict_outputs_export_their_logits(tmp_path, cls):
    torch.manual_seed(0)
    model = make_it_fire(binarize(cls().eval(), "bestformer", overrides={"reversible.enabled": False}).model, (16,))
    for fmt in ("qonnx", "onnx"):
        result = export_model(model, fmt, tmp_path / f"m_{fmt}.onnx", batch_size=2)
        assert result.verification.passed and result.verification.neurons
        proto = onnx.load(str(result.path))
        assert len(proto.graph.output) == 1
        assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [2, 4]
        assert verify_file(result.path, model, samples=2).passed


def test_formats_share_one_traced_graph_and_say_what_they_do(tmp_path, tiny_mlp_binary, monkeypatch):
    from bestcompress.exporters import qonnx

    calls = []
    real = qonnx.to_qonnx
    monkeypatch.setattr(qonnx, "to_qonnx", lambda *a, **k: calls.append(1) or real(*a, **k))
    lines: list[str] = []
    results = export_all(tiny_mlp_binary, {"qonnx": tmp_path / "q.onnx", "onnx": tmp_path / "s.onnx"},
                         batch_size=2, progress=lines.append)
    assert len(calls) == 1 and all(r.verification.passed for r in results.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "s.onnx"]
    assert any("tracing" in line for line in lines) and any("onnxruntime" in line for line in lines)
    assert any("lowering" in line for line in lines)
