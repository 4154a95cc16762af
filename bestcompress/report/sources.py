"""What a report is made of: the run folders, model files and export records found under the paths a user gives.

A run folder is a folder with a `metrics.jsonl` (written by `train`/`distill`; `last.pt` beside it says which kind
of run it was). A model file is anything `bestcompress.load` reads (.pt, .pth, .bcz). A folder such as the digits
main job's output holds all three: its model files, `exports.json` (one record per verified export) and run
folders below it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ReportError

MODEL_SUFFIXES = (".pt", ".pth", ".tar", ".bcz")
EXPORTS_FILE = "exports.json"


@dataclass
class Run:
    """One training run: its name, kind ('train' teacher / 'distill' student / 'run') and per-epoch records."""

    name: str
    kind: str
    records: list[dict]
    folder: Path


@dataclass
class Sources:
    runs: list[Run] = field(default_factory=list)
    models: list[Path] = field(default_factory=list)
    exports: list[dict] = field(default_factory=list)


def _run_kind(folder: Path) -> str:
    """'train' or 'distill' from the run's last.pt (read safely), else guessed from the folder name."""
    last = folder / "last.pt"
    if last.is_file():
        from ..checkpoint import load_checkpoint_file
        try:
            obj = load_checkpoint_file(last)
            if isinstance(obj, dict) and obj.get("kind") in ("train", "distill"):
                return obj["kind"]
        except Exception:  # a damaged last.pt does not stop the report: the curves are in metrics.jsonl
            pass
    name = folder.name.lower()
    if "teacher" in name or name in ("fp", "train"):
        return "train"
    if "student" in name or "distill" in name or "bin" in name:
        return "distill"
    return "run"


def read_run(folder: Path) -> Run:
    """The run in `folder`; a torn last line (a run killed while writing) is skipped."""
    from ..training.run_state import read_metrics
    records = [r for r in read_metrics(folder / "metrics.jsonl") if isinstance(r, dict) and "epoch" in r]
    if not records:
        raise ReportError(f"Run folder '{folder}' has no epoch records in its metrics.jsonl; train or distill "
                          "at least one epoch into it first.")
    return Run(name=folder.name, kind=_run_kind(folder), records=records, folder=folder)


def _read_exports(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ReportError(f"'{path}' is not a readable exports record (JSON list of exports).") from None
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise ReportError(f"'{path}' is not a JSON list of export records.")
    return data


def collect(paths: list[Path]) -> Sources:
    """Run folders, model files and export records under `paths` (folders searched two levels deep).

    Raises:
        ReportError: a path that does not exist, or nothing a report could show.
    """
    out = Sources()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ReportError(f"'{p}' does not exist; give run folders (with metrics.jsonl) or model files.")
        if p.is_file():
            if p.name == EXPORTS_FILE:
                out.exports.extend(_read_exports(p))
            elif p.name == "metrics.jsonl":
                out.runs.append(read_run(p.parent))
            else:
                out.models.append(p)
            continue
        found = False
        for depth_glob in ("metrics.jsonl", "*/metrics.jsonl", "*/*/metrics.jsonl"):
            for m in sorted(p.glob(depth_glob)):
                out.runs.append(read_run(m.parent))
                found = True
        for m in sorted(p.iterdir()):
            if m.is_file() and m.suffix in MODEL_SUFFIXES and not m.name.startswith(".") and m.name != "last.pt":
                out.models.append(m)
                found = True
        if (p / EXPORTS_FILE).is_file():
            out.exports.extend(_read_exports(p / EXPORTS_FILE))
            found = True
        if not found:
            raise ReportError(f"'{p}' is not a run folder: it holds no metrics.jsonl and no model file.")
    return out
