"""`bestcompress run model.bcz --data ...`: the 1-bit engine on a data set's test split (top-1 and latency)."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click

from ..errors import CheckpointError, DataError
from .options import threads_option

PATH = click.Path(dir_okay=False, path_type=Path)


def run_engine(file: Path, data: str, batch_size: int = 32, samples: int | None = None,
               latency_runs: int = 5) -> dict:
    """Top-1 accuracy of the engine on the test split of `data`, and its latency; what `run` prints."""
    import torch

    from ..data import load_dataset
    from ..engine import load

    if not Path(file).is_file():
        raise CheckpointError(f"'{file}' does not exist; pass a packed model written by "
                              "`bestcompress export --format packed`.")
    engine = load(file)
    bundle = load_dataset(data, engine.model, input_shape=engine.input_shape)
    x, y = bundle.test.tensors
    if samples is not None:
        x, y = x[:samples], y[:samples]
    if not len(x):
        raise DataError(f"The test split of '{data}' holds no samples.")
    g = torch.Generator().manual_seed(0)
    correct, seconds, cpu = 0, 0.0, 0.0
    for start in range(0, len(x), batch_size):
        xb = bundle.encoding(x[start:start + batch_size], g)
        t0, c0 = time.perf_counter(), time.process_time()
        logits = engine(xb)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        correct += int((logits.argmax(-1) == y[start:start + batch_size]).sum())
    one = bundle.encoding(x[:1], g)
    engine(one)  # warm-up
    single = []
    for _ in range(latency_runs):
        t0 = time.perf_counter()
        engine(one)
        single.append(time.perf_counter() - t0)
    return {"file": str(file), "data": str(data), "samples": int(len(x)), "top1": correct / len(x),
            "latency_ms_batch1": 1000 * statistics.median(single), "batch_size": batch_size,
            "ms_per_sample": 1000 * seconds / len(x), "cpu_ms_per_sample": 1000 * cpu / len(x),
            "threads": torch.get_num_threads(),
            "engine": engine.describe(), "memory": engine.memory()}


@click.command("run")
@click.argument("file", type=PATH)
@click.option("--data", required=True, metavar="SOURCE",
              help="digits, mnist1d, synthetic, an image folder or an .npz file (x, y and optional x_test, y_test).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--samples", type=click.IntRange(min=1), help="Use only the first N test samples.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@threads_option
def run(file, data, batch_size, samples, as_json):
    """Run a packed .bcz model on the 1-bit engine: top-1 on the test split of --data, and latency."""
    result = run_engine(file, data, batch_size, samples)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    mem = result["memory"]
    click.echo(f"{file} on {data}: top-1 {100 * result['top1']:.2f} % of {result['samples']} test samples")
    click.echo(f"latency: {result['latency_ms_batch1']:.2f} ms at batch 1, {result['ms_per_sample']:.2f} ms per "
               f"sample at batch {batch_size} ({result['cpu_ms_per_sample']:.2f} ms of CPU time; "
               f"{result['threads']} torch threads, the popcount kernels use one)")
    click.echo(f"engine: {result['engine']}")
    click.echo(f"memory: {mem['packed_weight_bytes'] / 1e6:.3f} MB packed binary weights, "
               f"{mem['other_bytes'] / 1e6:.3f} MB other parameters, "
               f"{(mem['activation_bytes'] or 0) / 1e6:.3f} MB activations of the largest layer at batch 1")


COMMANDS = [run]
