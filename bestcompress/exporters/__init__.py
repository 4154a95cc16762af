"""Export binary BESTformers, each export verified numerically against PyTorch before it is written.

    from bestcompress.exporters import export, verify_file
    export(binary_model, "qonnx", "bin.onnx")     # QONNX: BipolarQuant weights, {0,1} spikes, T unrolled
    export(binary_model, "onnx", "bin_std.onnx")  # standard ONNX for onnxruntime
    export(binary_model, "finn", "finn_dir/")     # QONNX + FINN+ front-end + per-node coverage report
    export(binary_model, "packed", "bin.bcz")     # 1 bit per binary weight; bestcompress.load() reads it back
    verify_file("bin.onnx", binary_model)         # re-check a file of any format

This module is the dispatcher: each format module registers its export, verify and recognise functions in the
registry (`formats.py`), and this module, above them, picks one by name or by file. Every exporter writes its
output only after the verification passed, and atomically: a failed export leaves nothing behind. Models that
return a tuple or dict export their logits (a tensor; a tuple's first tensor, Nones dropped; 'logits'/'out').
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError
from . import finn, onnx, packed, qonnx  # noqa: F401  (each registers its format)
from .formats import (
    ExportFormat, ExportOptions, ExportResult, Progress, get_format, list_formats, register_format, registered,
    stderr_progress,
)
from .report import DEFAULT_TOLERANCE, VerifyReport


def check_output_path(path: str | os.PathLike, fmt: str, inputs=()) -> Path:
    """Fail early (before any work) when the output cannot be written, or is one of the command's `inputs`."""
    from ..fileio import check_output_path as check

    spec = get_format(fmt)
    path = Path(path)
    if spec.suffix and path.is_dir():
        raise ExportError(f"Cannot write '{path}': it is a folder; give a file name for the {fmt} format.")
    path = check(path, ExportError, inputs=inputs, folder_ok=not spec.suffix)
    if spec.needs is not None:
        spec.needs()  # an optional extra (FINN+): say how to install it before any work is done
    return path


def _example_input(model: nn.Module, example_input, input_shape, batch_size: int, seed: int) -> torch.Tensor:
    from ..model_facts import example_input_for

    if example_input is None:
        example_input = example_input_for(model, input_shape, batch=batch_size, seed=seed)
        if example_input is None:
            raise ExportError("The model's input shape is unknown; pass input_shape (CLI: --input-shape C,H,W).")
    return example_input.detach().cpu()


def export_all(model: nn.Module, outputs: dict[str, str | os.PathLike], example_input: torch.Tensor | None = None,
               input_shape=None, batch_size: int = 1, verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
               data: str | os.PathLike | None = None, samples: int | None = None, seed: int = 0,
               progress: Progress | None = None) -> dict[str, ExportResult]:
    """Export one model to several formats ({format: path}); the ONNX-based formats share one traced graph.

    Returns:
        {format: ExportResult}, in the order given.
    """
    from .packed import fp32_bytes

    specs = {fmt: get_format(fmt) for fmt in outputs}
    paths = {fmt: check_output_path(p, fmt) for fmt, p in outputs.items()}
    start = time.perf_counter()
    say = progress or stderr_progress(start)
    example_input = _example_input(model, example_input, input_shape, batch_size, seed)
    results: dict[str, ExportResult] = {}
    was_training = model.training
    model.eval()
    try:
        graph = None
        if any(fmt in ("qonnx", "onnx", "finn") for fmt in specs):
            graph = qonnx.to_qonnx(model, example_input, say)
        for fmt, spec in specs.items():
            t0 = time.perf_counter()
            say(f"{fmt}: writing {paths[fmt]}")
            opts = ExportOptions(example_input=example_input, data=data, samples=samples, tolerance=tolerance,
                                 seed=seed, verify=verify, progress=say, qonnx_graph=graph)
            result = spec.export(model, paths[fmt], opts)
            # the first format's time includes tracing the shared graph
            result.seconds = time.perf_counter() - (t0 if results else start)
            result.fp32_bytes = fp32_bytes(model)
            results[fmt] = result
    finally:
        model.train(was_training)
    return results


def export_model(model: nn.Module, format: str, path: str | os.PathLike, example_input: torch.Tensor | None = None,
                 input_shape=None, batch_size: int = 1, verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                 data: str | os.PathLike | None = None, samples: int | None = None, seed: int = 0,
                 progress: Progress | None = None) -> ExportResult:
    """Export and verify a binary model; see `export`. Returns the ExportResult (sizes, verification, seconds).

    `progress` is called with a line as each stage starts (default: printed to stderr when it is a terminal).
    """
    return export_all(model, {format: path}, example_input, input_shape, batch_size, verify, tolerance, data,
                      samples, seed, progress)[format]


def export(model: nn.Module, format: str, path: str | os.PathLike, example_input: torch.Tensor | None = None,
           **kwargs) -> Path:
    """Export a binary model to `format` at `path`, after verifying the export against PyTorch.

    Args:
        model: a binary model (from `binarize` or `bestcompress.load`).
        format: one of list_formats(): 'qonnx', 'onnx', 'finn', 'packed'.
        path: the output file (a folder for 'finn'); its folder must exist.
        example_input: a batch the model accepts; its batch size is fixed in ONNX graphs. Made from the model's
            input shape when None (`input_shape`, `batch_size` in kwargs).
        **kwargs: input_shape, batch_size, verify, tolerance (default 1e-4 on the outputs), data (an .npz with
            `x`), samples, seed, progress.
    Returns:
        The path written.
    Raises:
        ExportError: unknown format, unwritable path, a model that cannot be exported, or a failed verification
            (then nothing is written).
    """
    return export_model(model, format, path, example_input, **kwargs).path


def format_of(path: str | os.PathLike) -> ExportFormat:
    """The registered format a file (or folder) belongs to, asked of each format in turn; nothing is executed."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"'{path}' does not exist.")
    for spec in registered():
        if spec.recognise(path):
            return spec
    raise ExportError(f"'{path}' is neither an ONNX graph, a packed .bcz artifact nor a FINN export folder.")


def verify_file(path: str | os.PathLike, model: nn.Module, data=None, samples: int | None = None,
                tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, progress: Progress | None = None) -> VerifyReport:
    """Re-check an exported file (.onnx QONNX or standard, .bcz packed, or a FINN export folder) against the
    binary PyTorch model it was exported from. An ONNX file whose custom-op domains are not ONNX, QONNX or FINN
    ones is refused before anything runs it."""
    spec = format_of(path)
    opts = ExportOptions(data=data, samples=samples, tolerance=tolerance, seed=seed,
                         progress=progress or stderr_progress())
    was_training = model.training
    model.eval()
    try:
        return spec.verify(Path(path), model, opts)
    finally:
        model.train(was_training)


def load_exported(path: str | os.PathLike, trust: bool = False) -> tuple[nn.Module, dict]:
    """A binary model from a bestcompress binary checkpoint or a packed .bcz artifact: (model, info)."""
    from ..loading import load, load_binary
    from .packed import is_packed

    if is_packed(path):
        loaded = load(path, trust=trust)
        return loaded.model, loaded.info
    model, _, info = load_binary(path, trust=trust)
    return model, info


__all__ = ["ExportFormat", "ExportOptions", "ExportResult", "VerifyReport", "check_output_path", "export",
           "export_all", "export_model", "format_of", "get_format", "list_formats", "load_exported",
           "register_format", "verify_file"]
