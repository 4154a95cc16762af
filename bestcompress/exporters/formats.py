"""The export-format registry and what every format shares: options, results, verified atomic writes, progress.

A format module (qonnx.py, onnx.py, finn.py, packed.py) registers three functions under its name:

    export(model, path, options) -> ExportResult      writes `path` only after its verification passed
    verify(path, model, options) -> VerifyReport      re-checks a file of this format against a PyTorch model
    recognise(path) -> bool                           is this file (or folder) one of mine? (cheap, runs nothing)

The dispatcher (`bestcompress.exporters`) sits above the format modules and imports them; no format module imports
the dispatcher, and this registry imports no format module.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ExportError
from .report import DEFAULT_TOLERANCE, VerifyReport

Progress = Callable[[str], None]


def stderr_progress(start: float | None = None) -> Progress:
    """A progress callback printing `export: <seconds> s: <line>` to stderr, when stderr is a terminal."""
    t0 = time.perf_counter() if start is None else start

    def say(line: str) -> None:
        if sys.stderr.isatty():
            print(f"export: {time.perf_counter() - t0:6.1f} s: {line}", file=sys.stderr, flush=True)
    return say


def no_progress(line: str) -> None:
    """A progress callback that says nothing."""


@dataclass(frozen=True)
class ExportOptions:
    """What every exporter receives besides the model and the path."""

    example_input: torch.Tensor | None = None
    data: str | os.PathLike | None = None
    samples: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    seed: int = 0
    verify: bool = True
    progress: Progress = no_progress
    qonnx_graph: object | None = None  # a QONNX ModelProto already traced from this model (shared across formats)


@dataclass
class ExportResult:
    """What an export wrote and how it verified."""

    path: Path
    format: str
    bytes: int
    fp32_bytes: int
    verification: VerifyReport | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """How many times smaller than the fp32 weights."""
        return self.fp32_bytes / self.bytes if self.bytes else 0.0

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "bytes": self.bytes, "fp32_bytes": self.fp32_bytes,
                "ratio": round(self.ratio, 3), "seconds": round(self.seconds, 3),
                "verification": self.verification.to_dict() if self.verification else None, **self.extra}


@dataclass(frozen=True)
class ExportFormat:
    """One registered format: its name, a one-line description, the output suffix ('' for a folder) and its
    export / verify / recognise functions (see the module docstring)."""

    name: str
    description: str
    suffix: str
    export: Callable[[nn.Module, Path, ExportOptions], ExportResult]
    verify: Callable[[Path, nn.Module, ExportOptions], VerifyReport]
    recognise: Callable[[Path], bool]
    needs: Callable[[], None] | None = None  # raises ExportError when an optional dependency is missing


_FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Register (or replace) a format under `fmt.name`."""
    _FORMATS[fmt.name] = fmt
    return fmt


def list_formats() -> list[str]:
    return sorted(_FORMATS)


def registered() -> list[ExportFormat]:
    """The registered formats in registration order (the order `recognise` is asked in)."""
    return list(_FORMATS.values())


def get_format(name: str) -> ExportFormat:
    if name not in _FORMATS:
        raise ExportError(f"Unknown export format '{name}'; choose one of {', '.join(list_formats())}.")
    return _FORMATS[name]


# -------------------------------------------------------------------------------------------- writing

def path_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def make_readable(path: Path) -> None:
    """Give a folder (and its files) the permissions the umask gives new ones: temporary folders are created
    private (0700) and then renamed into place. (Files written by atomic_write already get them.)"""
    umask = os.umask(0)
    os.umask(umask)
    if path.is_dir():
        os.chmod(path, 0o777 & ~umask)
        for p in path.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    elif path.exists():
        os.chmod(path, 0o666 & ~umask)


def write_verified(path: Path, write: Callable[[Path], None], verify: Callable[[Path], VerifyReport | None],
                   what: str) -> VerifyReport | None:
    """Write through a temporary file next to `path` (bestcompress.fileio.atomic_write), verify the temporary
    file, and move it into place only when the verification passed (nothing is left behind otherwise)."""
    from ..fileio import atomic_write

    report = None

    def build(tmp: Path) -> None:
        nonlocal report
        write(tmp)
        report = verify(tmp)
        if report is not None and not report.passed:
            raise ExportError(report.message(what))
    atomic_write(path, build)
    return report
