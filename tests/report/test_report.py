"""The report: every figure present and non-empty, numbers equal to what inspect/evaluate compute, a torn metrics
line tolerated, bad input refused with one sentence (exit 2)."""
import base64
import json
import re

import pytest
import torch

from bestcompress.checkpoint import save_binary, save_fp
from bestcompress.convert import binarize
from bestcompress.data import load_dataset
from bestcompress.errors import ReportError
from bestcompress.report import build_report, plot_layers, write_report
from bestcompress.report.firing import firing_rates
from bestcompress.report.page import summary_rows
from bestcompress.summary import summarize
from bestcompress.training.trainer import evaluate, train
from bestcompress.zoo import create_model
from tests.cli_helpers import assert_user_error, invoke

PNG = b"\x89PNG\r\n\x1a\n"
MODEL = dict(img_size=8, in_channels=3, num_classes=10, embed_dims=32, num_heads=2, mlp_ratios=2, depths=1, T=2)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny main job: a teacher trained 2 epochs into a run folder, its binary model, both saved."""
    out = tmp_path_factory.mktemp("job")
    torch.manual_seed(0)
    fp = create_model("spikformer_cifar", **MODEL)
    train(fp, "digits", "bestformer", out / "fp.pt", epochs=2, subset=96, run_dir=out / "runs" / "teacher",
          seed=0, overrides={"train.batch_size": 32})
    result = binarize(fp.eval(), "bestformer")
    save_binary(result.model, fp, out / "bin.pt")
    return out


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_page_has_every_figure_non_empty(job, tmp_path):
    report = build_report([job], data="digits", batches=1)
    page_path = write_report(report, tmp_path / "r.html", png_dir=tmp_path / "png")
    page = page_path.read_text()
    images = _images(page)
    assert len(images) == 1 + 2  # training curves + the layer bars of fp.pt and bin.pt
    assert all(img.startswith(PNG) and len(img) > 5000 for img in images)
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["layers_bin.png", "layers_fp.png", "training_curves.png"]
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert {m.kind for m in report.models} == {"fp", "binary"}
    assert [r.kind for r in report.runs] == ["train"]


def test_numbers_are_those_of_inspect_and_evaluate(job):
    report = build_report([job / "bin.pt"], data="digits", batches=1)
    (m,) = report.models
    from bestcompress.loading import load
    model = load(job / "bin.pt").model
    bundle = load_dataset("digits", model)
    assert m.scores == evaluate(model, bundle)
    x = bundle.encode(bundle.test.tensors[0][:1], torch.Generator().manual_seed(0))
    assert m.summary.to_dict() == summarize(model, x).to_dict()
    row = summary_rows(report)[0]
    assert row[2] == f"{m.scores['top1']:.2f} %" and row[5] == f"{m.summary.compression:.1f}x"


def test_firing_rates_are_spike_means_of_each_neuron(job):
    from bestcompress.loading import load
    from bestcompress.nn.lif import LIF
    model = load(job / "bin.pt").model
    x = torch.rand(4, *model.bc_input_shape)
    seen = {}

    def record(name):
        def hook(mod, args, out):
            seen[name] = float(out.float().mean())
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, LIF)]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rates = firing_rates(model, [x])
    assert rates.keys() == seen.keys() and len(rates) >= 5
    for name, rate in rates.items():
        assert rate == pytest.approx(seen[name], abs=1e-6) and 0.0 <= rate <= 1.0


def test_a_torn_metrics_line_still_renders(job, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = (job / "runs" / "teacher" / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])
    report = build_report([run])
    assert len(report.runs[0].records) == len(lines)
    assert _images(write_report(report, tmp_path / "r.html").read_text())[0].startswith(PNG)


def test_inspect_plot_draws_the_layer_bars(job, tmp_path):
    from bestcompress.loading import load
    out = plot_layers(load(job / "bin.pt").model, tmp_path / "layers.png")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 5000


def test_inspect_plot_and_report_never_overwrite_an_input(job, tmp_path):
    before = (job / "bin.pt").read_bytes()
    assert_user_error(invoke("report", job / "bin.pt", "-o", job / "bin.pt"), "is the input")
    assert_user_error(invoke("inspect", job / "bin.pt", "--plot", job / "bin.pt"), "is the input")
    assert (job / "bin.pt").read_bytes() == before
    result = invoke("inspect", job / "bin.pt", "--plot", tmp_path / "bars.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bars.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("case", ["missing", "empty_folder", "no_epochs", "bad_exports"])
def test_bad_input_is_one_sentence_and_exit_2(case, tmp_path):
    target = tmp_path / "x"
    if case == "empty_folder":
        target.mkdir()
    elif case == "no_epochs":
        target.mkdir()
        (target / "metrics.jsonl").write_text("")
    elif case == "bad_exports":
        target.mkdir()
        (target / "exports.json").write_text("{not json")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert_user_error(invoke("report", target, "-o", tmp_path / "r.html"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    with pytest.raises(ReportError):
        build_report([target])


def test_exports_record_is_shown(job, tmp_path):
    record = [{"format": "packed", "path": "bin.bcz", "bytes": 4096,
               "verification": {"max_abs_diff": 1.5e-7, "samples": 4, "runtime": "torch"}}]
    (tmp_path / "exports.json").write_text(json.dumps(record))
    page = write_report(build_report([tmp_path / "exports.json", job / "runs" / "teacher"]),
                        tmp_path / "r.html").read_text()
    assert "1.50e-07" in page and "bin.bcz" in page
