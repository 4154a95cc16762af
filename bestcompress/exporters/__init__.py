"""Export binary BESTformers, each export verified numerically against PyTorch before it is written.

    from bestcompress.exporters import export
    export(binary_model, "qonnx", "bin.onnx")     # QONNX: BipolarQuant weights, {0,1} spikes, T unrolled
    export(binary_model, "onnx", "bin_std.onnx")  # standard ONNX for onnxruntime
    export(binary_model, "finn", "finn_dir/")     # QONNX + FINN+ front-end + per-node coverage report
    export(binary_model, "packed", "bin.bcz")     # 1 bit per binary weight; load_packed() reads it back

Formats are looked up in a registry (`register_format`, `list_formats`). Every exporter writes its output only
after the verification passed, and atomically: a failed export leaves nothing behind.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ExportError
from .verify import DEFAULT_TOLERANCE, VerifyReport


@dataclass(frozen=True)
class ExportOptions:
    """What every exporter receives besides the model and the path."""

    example_input: torch.Tensor
    data: str | os.PathLike | None = None
    samples: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    seed: int = 0
    verify: bool = True


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
    name: str
    description: str
    suffix: str  # '' for a folder
    exporter: Callable[[nn.Module, Path, ExportOptions], ExportResult]


_FORMATS: dict[str, ExportFormat] = {}


def register_format(name: str, description: str, suffix: str):
    """Decorator registering `exporter(model, path, options) -> ExportResult` under `name`."""
    def deco(fn):
        _FORMATS[name] = ExportFormat(name, description, suffix, fn)
        return fn
    return deco


def list_formats() -> list[str]:
    return sorted(_FORMATS)


def get_format(name: str) -> ExportFormat:
    if name not in _FORMATS:
        raise ExportError(f"Unknown export format '{name}'; choose one of {', '.join(list_formats())}.")
    return _FORMATS[name]


def path_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def make_readable(path: Path) -> None:
    """Give a file (or a folder and its files) the permissions the umask gives new files: temporary files are
    created private (0600/0700) and then renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    if path.is_dir():
        os.chmod(path, 0o777 & ~umask)
        for p in path.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    elif path.exists():
        os.chmod(path, 0o666 & ~umask)


def _write_verified(path: Path, write, verify, what: str) -> VerifyReport | None:
    """Write through a temporary file next to `path`, verify it, and only then move it into place."""
    from ..checkpoint import atomic_write

    report = None

    def build(tmp: Path) -> None:
        nonlocal report
        write(tmp)
        report = verify(tmp)
        if report is not None and not report.passed:
            raise ExportError(report.message(what))
    atomic_write(path, build)
    make_readable(path)
    return report


# ------------------------------------------------------------------------------------------------ formats

@register_format("qonnx", "QONNX graph for FINN: BipolarQuant weights, spikes as {0,1} thresholds, T unrolled",
                 ".onnx")
def _export_qonnx(model: nn.Module, path: Path, opts: ExportOptions) -> ExportResult:
    import onnx

    from .qonnx import to_qonnx
    from .verify import verify_graph

    proto = to_qonnx(model, opts.example_input)
    report = _write_verified(
        path, lambda tmp: onnx.save(proto, str(tmp)),
        lambda tmp: verify_graph(proto, model, "qonnx", opts.data, opts.samples, opts.tolerance, opts.seed)
        if opts.verify else None, "The QONNX export")
    return ExportResult(path, "qonnx", path_bytes(path), 0, report)


@register_format("onnx", "standard ONNX (QONNX ops lowered to standard ops) for onnxruntime", ".onnx")
def _export_onnx(model: nn.Module, path: Path, opts: ExportOptions) -> ExportResult:
    import onnx

    from .onnx import lower_to_standard
    from .qonnx import to_qonnx
    from .verify import verify_graph

    proto = lower_to_standard(to_qonnx(model, opts.example_input))
    report = _write_verified(
        path, lambda tmp: onnx.save(proto, str(tmp)),
        lambda tmp: verify_graph(onnx.load(str(tmp)), model, "onnxruntime", opts.data, opts.samples,
                                 opts.tolerance, opts.seed) if opts.verify else None, "The ONNX export")
    return ExportResult(path, "onnx", path_bytes(path), 0, report)


@register_format("finn", "a folder: QONNX, FINN+ front-end stages, FINN execution check, per-node coverage report",
                 "")
def _export_finn(model: nn.Module, path: Path, opts: ExportOptions) -> ExportResult:
    from .finn import export_finn

    out, report, verification = export_finn(model, opts.example_input, path, opts.data, opts.samples,
                                            opts.tolerance, opts.seed)
    make_readable(out)
    return ExportResult(out, "finn", path_bytes(out), 0, verification,
                        extra={"finn": {"totals": report["totals"], "stages": report["stages"],
                                        "notes": report["notes"], "qonnx_verification": report["verification"]["qonnx"]}})


@register_format("packed", "1 bit per binary weight (.bcz), everything else fp32; load_packed() rebuilds the model",
                 ".bcz")
def _export_packed(model: nn.Module, path: Path, opts: ExportOptions) -> ExportResult:
    from .packed import verify_packed, write_packed

    report = _write_verified(
        path, lambda tmp: write_packed(model, tmp),
        lambda tmp: verify_packed(tmp, model, opts.data, opts.samples, opts.tolerance, opts.seed)
        if opts.verify else None, "The packed artifact")
    return ExportResult(path, "packed", path_bytes(path), 0, report)


# ------------------------------------------------------------------------------------------------ the API

def check_output_path(path: str | os.PathLike, fmt: str) -> Path:
    """Fail early (before any work) when the output cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"Cannot write '{path}': the folder '{parent}' does not exist.")
    if get_format(fmt).suffix and path.is_dir():
        raise ExportError(f"Cannot write '{path}': it is a folder; give a file name for the {fmt} format.")
    if fmt == "finn":
        from .finn import _import_finn
        _import_finn()  # the optional extra: say how to install it before any work is done
    return path


def export_model(model: nn.Module, format: str, path: str | os.PathLike, example_input: torch.Tensor | None = None,
                 input_shape=None, batch_size: int = 1, verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                 data: str | os.PathLike | None = None, samples: int | None = None, seed: int = 0) -> ExportResult:
    """Export and verify a binary model; see `export`. Returns the ExportResult (sizes, verification)."""
    from ..model_facts import example_input_for
    from .packed import fp32_bytes

    fmt = get_format(format)
    path = check_output_path(path, format)
    if example_input is None:
        example_input = example_input_for(model, input_shape, batch=batch_size, seed=seed)
        if example_input is None:
            raise ExportError("The model's input shape is unknown; pass input_shape (CLI: --input-shape C,H,W).")
    example_input = example_input.detach().cpu()
    opts = ExportOptions(example_input=example_input, data=data, samples=samples, tolerance=tolerance, seed=seed,
                         verify=verify)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        result = fmt.exporter(model, path, opts)
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - t0
    result.fp32_bytes = fp32_bytes(model)
    return result


def export(model: nn.Module, format: str, path: str | os.PathLike, example_input: torch.Tensor | None = None,
           **kwargs) -> Path:
    """Export a binary model to `format` at `path`, after verifying the export against PyTorch.

    Args:
        model: a binary model (from `binarize` or `load_binary`).
        format: one of list_formats(): 'qonnx', 'onnx', 'finn', 'packed'.
        path: the output file (a folder for 'finn'); its folder must exist.
        example_input: a batch the model accepts; its batch size is fixed in ONNX graphs. Made from the model's
            input shape when None (`input_shape`, `batch_size` in kwargs).
        **kwargs: input_shape, batch_size, verify, tolerance (default 1e-4 on the outputs), data (an .npz with
            `x`), samples, seed.
    Returns:
        The path written.
    Raises:
        ExportError: unknown format, unwritable path, a model that cannot be exported, or a failed verification
            (then nothing is written).
    """
    return export_model(model, format, path, example_input, **kwargs).path


def load_exported(path: str | os.PathLike, trust: bool = False) -> tuple[nn.Module, dict]:
    """A binary model from a bestcompress binary checkpoint or a packed .bcz artifact: (model, info)."""
    from .packed import is_packed, load_packed, read_header

    path = Path(path)
    if is_packed(path):
        header = read_header(path)
        return load_packed(path), {"kind": "packed", "path": str(path), "spec": header.get("spec"),
                                    "input_shape": header.get("input_shape"), "recipe": header.get("recipe")}
    from ..loading import load_binary
    model, _, info = load_binary(path, trust=trust)
    return model, info


__all__ = ["ExportFormat", "ExportResult", "export", "export_model", "get_format", "list_formats", "load_exported",
           "register_format"]
