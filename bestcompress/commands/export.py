"""Export commands: `export` (qonnx | onnx | finn | packed, verified before writing) and `verify`."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ExportError
from .options import threads_option

PATH = click.Path(path_type=Path)  # existence is checked by the loaders (one-sentence errors)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _parse_shape(text: str | None):
    from .core import parse_input_shape
    return parse_input_shape(text)


def _load(path: Path, trust: bool, input_shape, command: str, model_factory: str | None = None):
    """The binary model of a binary checkpoint or .bcz (bc.load), refusing non-finite weights."""
    from ..checkpoint import check_finite
    from .core import load_binary_model

    loaded = load_binary_model(path, trust=trust, model_factory=model_factory, command=command)
    check_finite(loaded.model.state_dict(), f"'{path}'")
    if input_shape is not None:
        loaded.model.bc_input_shape = tuple(input_shape)
    return loaded


def _factory_option(f):
    return click.option("--model", "model_factory", metavar="FILE.py:FN",
                        help="The factory that built the source model, when the checkpoint names your own code.")(f)


def _verification_options(f):
    """The options `export` and `verify` share: what to verify on, how strictly, and what may run."""
    for option in reversed([
        click.option("--data", type=PATH, help="An .npz file with an array x of real inputs to verify on."),
        click.option("--samples", type=click.IntRange(min=1), help="How many inputs to verify on [default: one batch]."),
        click.option("--tolerance", default=1e-4, show_default=True, type=click.FloatRange(min=0),
                     help="Largest allowed output difference."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow a pickled source model or a factory the file names (runs code: trusted files only)."),
        _factory_option, threads_option]):
        f = option(f)
    return f


def _verification_line(report) -> str:
    return "verified: " + report.message("the export")


@click.command("export")
@click.argument("checkpoint", type=PATH)
@click.option("-f", "--format", "fmt", required=True, metavar="FORMAT",
              help="qonnx, onnx, finn (a folder) or packed (.bcz).")
@click.option("-o", "--output", required=True, type=PATH, help="Output file (a folder for --format finn).")
@click.option("--input-shape", help="Per-sample input shape, e.g. 3,32,32 [default: from the checkpoint].")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Batch size fixed in ONNX graphs.")
@_verification_options
def export(checkpoint, fmt, output, input_shape, batch_size, data, samples, tolerance, trust_checkpoint,
           model_factory):
    """Export a binary checkpoint (or .bcz) to FORMAT; the export is verified against PyTorch before it is written."""
    from ..building import factory_file
    from ..exporters import check_output_path, export_model
    from ..fileio import probe_writable

    # unknown format, missing or read-only folder, output == input: fail before loading anything
    output = check_output_path(output, fmt, inputs=[checkpoint, data, factory_file(model_factory)])
    probe_writable(output.parent if str(output.parent) else Path("."), ExportError)
    shape = _parse_shape(input_shape)
    model = _load(checkpoint, trust_checkpoint, shape, "export", model_factory).model
    result = export_model(model, fmt, output, input_shape=shape, batch_size=batch_size, data=data, samples=samples,
                          tolerance=tolerance)
    size = (f"{result.ratio:.1f}× smaller than" if result.ratio >= 1 else f"{1 / result.ratio:.2f}× the size of")
    click.echo(f"wrote {result.path} ({fmt}): {_mb(result.bytes)}, {size} the fp32 weights "
               f"({_mb(result.fp32_bytes)}); {result.seconds:.1f} s")
    if result.verification is not None:
        click.echo(_verification_line(result.verification))
    finn = result.extra.get("finn")
    if finn:
        t = finn["totals"]
        w = t["binary_weight_layers"]
        click.echo(f"FINN: {t['hw']} of {t['nodes']} nodes became hardware layers ({100 * t['hw_fraction']:.1f} %), "
                   f"1-bit-weight matrix layers on MVAU/VVAU: {w['mvau']} of {w['mvau'] + w['not_mapped']}; "
                   f"per-node report in {Path(result.path) / 'report.txt'}")
        for reason, n in list(t["by_reason"].items())[:6]:
            click.echo(f"  {n:>5} not mapped: {reason}")


@click.command("verify")
@click.argument("file", type=PATH)
@click.option("--against", required=True, type=PATH, help="The binary checkpoint (or .bcz) the file was exported from.")
@_verification_options
def verify(file, against, data, samples, tolerance, trust_checkpoint, model_factory):
    """Re-check an exported FILE (.onnx, .bcz or a FINN folder) against the PyTorch model."""
    from ..exporters import verify_file

    if not Path(file).exists():
        raise ExportError(f"'{file}' does not exist.")
    loaded = _load(against, trust_checkpoint, None, "verify --against", model_factory)
    report = verify_file(file, loaded.model, data=data, samples=samples, tolerance=tolerance)
    if not report.passed:
        raise ExportError(report.message(f"'{file}'"))
    click.echo(report.message(f"'{file}'"))
    from ..engine.verify import check_packed_file  # a .bcz: the 1-bit engine must be spike-exact too
    engine_line = check_packed_file(file, loaded.model, data=data, samples=samples, tolerance=tolerance)
    if engine_line:
        click.echo(engine_line)
    worst = sorted((n for n in report.neurons if n.flipped), key=lambda n: -n.flip_fraction)[:5]
    for n in worst:
        click.echo(f"  {n.path}: {100 * n.flip_fraction:.3g} % spikes differ")


COMMANDS = [export, verify]
