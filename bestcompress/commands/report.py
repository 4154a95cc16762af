"""`bestcompress report`: runs and models on one self-contained HTML page."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="The HTML page to write.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write each figure as a PNG into this folder.")
@click.option("--data", default=None, help="Data set (digits, mnist1d, a .npz, ...) for accuracy and firing rates.")
@click.option("--batches", type=click.IntRange(min=1), default=2, show_default=True,
              help="Batches of 32 the firing rates are measured on.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow model files that hold pickled code.")
def report(paths, output, png_dir, data, batches, trust_checkpoint):
    """Training curves, per-layer bits/MACs/firing rates and the summary of run folders and model files."""
    from ..errors import ReportError
    from ..fileio import check_output_path
    from ..report import build_report, write_report
    check_output_path(output, ReportError, inputs=[p for p in paths if p.is_file()], probe=True)  # before any work
    built = build_report(list(paths), data=data, batches=batches, trust=trust_checkpoint)
    page = write_report(built, output, png_dir)
    click.echo(f"Wrote {page} ({len(built.runs)} runs, {len(built.models)} models"
               f"{f', figures in {png_dir}' if png_dir else ''}).")


COMMANDS = [report]
