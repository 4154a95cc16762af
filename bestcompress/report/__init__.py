"""`bestcompress report`: one self-contained HTML page (images embedded) that shows runs and models at a glance.

    from bestcompress.report import build_report, write_report
    report = build_report(["runs/digits"], data="digits")   # numbers: the same functions as inspect / evaluate
    write_report(report, "report.html", png_dir="figures/")

Training curves come from each run folder's metrics.jsonl; per-layer bars and totals from `summarize` (what
`bestcompress inspect` prints); accuracy from `evaluate` (what `bestcompress evaluate` prints); firing rates from
forward hooks on every neuron over a few batches of the data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ReportError
from .sources import Run, collect


@dataclass
class ModelReport:
    """What the report shows of one model file."""

    path: Path
    kind: str  # 'fp', 'binary' or 'packed'
    summary: object  # bestcompress.summary.Summary
    scores: dict | None  # evaluate(...) output, None without data
    rates: dict[str, float]
    layer_png: bytes = b""


@dataclass
class Report:
    runs: list[Run] = field(default_factory=list)
    models: list[ModelReport] = field(default_factory=list)
    exports: list[dict] = field(default_factory=list)
    data_name: str | None = None
    notes: list[str] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)  # every file read (the page may overwrite none of them)
    curves_png: bytes = b""


def _batches(bundle, count: int, batch_size: int = 32):
    import torch
    x, _ = bundle.test.tensors
    gen = torch.Generator().manual_seed(0)
    return [bundle.encode(x[i:i + batch_size], gen) for i in range(0, min(len(x), count * batch_size), batch_size)]


def model_report(path: Path, data: str | None, batches: int = 2, trust: bool = False) -> ModelReport:
    """Summary, accuracy and firing rates of the model in `path`, with its per-layer picture."""
    from ..data import load_dataset
    from ..loading import load
    from ..model_facts import example_input_for
    from ..summary import summarize
    from ..training.trainer import evaluate
    from .figures import layer_bars
    from .firing import firing_rates

    loaded = load(path, trust=trust)
    model = loaded.model
    if data is not None:
        bundle = load_dataset(data, model)
        inputs = _batches(bundle, batches)
        scores = evaluate(model, bundle)
        summary = summarize(model, inputs[0][:1])
    else:
        example = example_input_for(model, batch=8)
        if example is None:
            raise ReportError(f"The input shape of the model in '{path}' is unknown; pass --data so the report can "
                              "run it.")
        inputs, scores, summary = [example], None, summarize(model)
    rates = firing_rates(model, inputs)
    return ModelReport(path=Path(path), kind=loaded.kind, summary=summary, scores=scores, rates=rates,
                       layer_png=layer_bars(summary, rates))


def build_report(paths: list[str | os.PathLike], data: str | None = None, batches: int = 2,
                 trust: bool = False) -> Report:
    """Everything the page shows, computed once.

    Args:
        paths: run folders, folders holding runs and model files (such as the digits main job's), model files.
        data: a data set name or path for accuracy and firing rates (None: no accuracy, rates on random input).
        batches: how many batches (of 32) the firing rates are measured on.
        trust: as --trust-checkpoint, for model files that hold pickled code.
    Returns:
        A Report (`write_report` turns it into HTML).
    Raises:
        ReportError: a path that is missing, or a folder that is not a run folder.
    """
    from .figures import training_curves
    if not paths:
        raise ReportError("Give at least one run folder or model file to report on.")
    sources = collect([Path(p) for p in paths])
    report = Report(runs=sources.runs, exports=sources.exports, data_name=data,
                    inputs=sources.models + [r.folder / "metrics.jsonl" for r in sources.runs])
    if sources.runs:
        report.curves_png = training_curves(sources.runs)
    else:
        report.notes.append("No run folder was given, so there are no training curves.")
    if data is None and sources.models:
        report.notes.append("No data was given (--data): no accuracy, and firing rates were measured on random input.")
    for p in sources.models:
        report.models.append(model_report(p, data, batches, trust))
    return report


def write_report(report: Report, output: str | os.PathLike, png_dir: str | os.PathLike | None = None) -> Path:
    """Write the page (atomically) and, with `png_dir`, each figure as its own PNG file. Returns the page's path."""
    from ..fileio import atomic_write, check_output_path
    from .page import render_html

    output = check_output_path(output, ReportError, inputs=report.inputs)
    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        figures = [("training_curves.png", report.curves_png)]
        figures += [(f"layers_{m.path.stem}.png", m.layer_png) for m in report.models]
        for name, png in figures:
            if png:
                atomic_write(png_dir / name, lambda tmp, png=png: Path(tmp).write_bytes(png))
    html = render_html(report)
    return atomic_write(output, lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))


def plot_layers(model, output: str | os.PathLike, example_input=None, input_shape=None) -> Path:
    """`inspect --plot`: the per-layer bars (bits, parameters, MACs, firing rates) of `model` as a PNG."""
    from ..fileio import atomic_write, check_output_path
    from ..model_facts import example_input_for
    from ..summary import summarize
    from .figures import layer_bars
    from .firing import firing_rates

    output = check_output_path(output, ReportError)
    if example_input is None:
        example_input = example_input_for(model, input_shape, batch=1)
    summary = summarize(model, example_input)
    png = layer_bars(summary, firing_rates(model, [example_input]))
    return atomic_write(output, lambda tmp: Path(tmp).write_bytes(png))


__all__ = ["ModelReport", "Report", "build_report", "plot_layers", "write_report"]
