"""How long `binarize` takes on a large model, and what it produces.

Builds spikformer_imagenet in its default configuration (Spikformer-8-512, 224 px, T=4, ~30 M parameters),
times `binarize(model, recipe='bestformer')` on the CPU (target: under 5 s), summarizes the binary model and
prints a table; the numbers go to benchmarks/results/bench_binarize.json.

    python benchmarks/bench_binarize.py [--arch spikformer_imagenet] [--recipe bestformer] [--repeats 1] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import time
from pathlib import Path

import torch

from bestcompress.convert import binarize
from bestcompress.summary import summarize
from bestcompress.zoo import create_model

RESULTS = Path(__file__).resolve().parent / "results" / "bench_binarize.json"
TARGET_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="spikformer_imagenet")
    parser.add_argument("--recipe", default="bestformer")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print the 25 most expensive calls of one run")
    args = parser.parse_args()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = create_model(args.arch).eval()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())

    binarize(create_model(args.arch, embed_dims=64, depths=1, num_heads=2, num_classes=10))  # warm up imports
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = binarize(model, recipe=args.recipe)
        times.append(time.perf_counter() - t0)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        binarize(model, recipe=args.recipe)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())

    # What binarize would cost if its passes got a FakeTensor example input (they read only shapes from it).
    from torch._subclasses.fake_tensor import FakeTensorMode
    fake = FakeTensorMode(allow_non_fake_inputs=True).from_tensor(torch.rand((2,) + tuple(model.input_shape)))
    t0 = time.perf_counter()
    binarize(model, recipe=args.recipe, example_input=fake)
    fake_s = time.perf_counter() - t0
    with torch.no_grad():
        x = torch.rand((1,) + tuple(model.input_shape))
        t0 = time.perf_counter()
        model(x)
        forward_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = summarize(result.model)
    summary_s = time.perf_counter() - t0
    record = {
        "arch": args.arch, "recipe": args.recipe, "params": params, "build_s": round(build_s, 3),
        "binarize_s": round(min(times), 3), "binarize_s_all": [round(t, 3) for t in times],
        "target_s": TARGET_S, "within_target": min(times) < TARGET_S, "summarize_s": round(summary_s, 3),
        "binarize_fake_input_s": round(fake_s, 3), "fp_forward_batch1_s": round(forward_s, 3),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "model_bytes": summary.model_bytes, "fp32_bytes": summary.fp32_bytes,
        "compression": round(summary.compression, 2), "binary_mac_fraction": round(summary.binary_mac_fraction, 4),
        "macs_per_sample": summary.macs, "binary_layers": summary.binary_layers,
        "weight_layers": summary.weight_layers, "notes": result.notes,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
        platform.machine(),
    }
    rows = [
        ("model", f"{args.arch} (default cfg), recipe {args.recipe}"),
        ("parameters", f"{params:,}"),
        ("build model", f"{build_s:.2f} s"),
        ("binarize", f"{min(times):.2f} s (target < {TARGET_S:.0f} s: {'yes' if min(times) < TARGET_S else 'NO'})"),
        ("binarize, FakeTensor input", f"{fake_s:.2f} s (the passes need only shapes)"),
        ("one FP forward, batch 1", f"{forward_s:.2f} s"),
        ("summarize", f"{summary_s:.2f} s"),
        ("load average", " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"),
        ("binary size", f"{summary.model_bytes / 1e6:.2f} MB"),
        ("fp32 size", f"{summary.fp32_bytes / 1e6:.2f} MB"),
        ("compression", f"{summary.compression:.1f}x"),
        ("binary MACs", f"{summary.binary_mac_fraction:.2%} of {summary.macs / 1e9:.2f} G per sample"),
        ("binary layers", f"{summary.binary_layers} of {summary.weight_layers}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
