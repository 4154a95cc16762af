"""When binarize's FakeTensor example input pays: one binarization with a FakeTensor example vs one with the real
example, interleaved in one process (A B A B ..., process CPU time, one torch thread), per model size.

A FakeTensor costs a fixed dispatch overhead per op and nothing per element; a real forward costs per element.
So the real input wins on small models (the zoo's tiny configurations, the tests' models) and the fake one on
large ones (224-px ImageNet models, where it turns minutes into seconds: benchmarks/bench_binarize.py).
bestcompress/convert.py uses the fake input only when parameters × input elements per sample reach
FAKE_MIN_WORK; the table prints that product per row. Results: benchmarks/results/fake_input.json and .md.

    python benchmarks/bench_fake_input.py [--reps 3] [--archs qkformer,sdt_v2,...] [--full spikformer_cifar]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import bestcompress.convert as cv
from bestcompress.recipe import load_recipe
from bestcompress.zoo import create_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "fake_input"


def measure(model, reps: int) -> dict:
    x = torch.rand((2,) + tuple(model.input_shape))
    recipe = load_recipe("bestformer", None)
    fake = cv._fake_copy(x)
    cv._binarize_once(model, recipe, x)  # imports and caches warmed
    times = {"fake": [], "real": []}
    for _ in range(reps):
        for kind in ("fake", "real"):
            t = time.process_time()
            cv._binarize_once(model, recipe, fake if kind == "fake" else x)
            times[kind].append(time.process_time() - t)
    work = sum(p.numel() for p in model.parameters()) * x[0].numel()
    fake_s, real_s = statistics.median(times["fake"]), statistics.median(times["real"])
    return {"work": work, "fake_s": round(fake_s, 3), "real_s": round(real_s, 3),
            "real_over_fake": round(real_s / fake_s, 3), "uses_fake": work >= cv.FAKE_MIN_WORK}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--archs", default="qkformer,sdt_v1,sdt_v2,spikformer_cifar,spikformer_seq,spikingformer")
    ap.add_argument("--full", default="spikformer_cifar", help="default-size models too (comma list; '' for none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for arch in [a for a in args.archs.split(",") if a]:
        torch.manual_seed(0)
        rows[f"{arch} tiny"] = measure(tiny_model(arch).eval(), args.reps)
    for arch in [a for a in args.full.split(",") if a]:
        torch.manual_seed(0)
        rows[f"{arch} default"] = measure(create_model(arch).eval(), max(1, args.reps - 2))
    lines = ["| model | params × input elements | fake input s | real input s | real / fake | binarize uses |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['work']:.2e} | {r['fake_s']:.2f} | {r['real_s']:.2f} | {r['real_over_fake']:.2f} "
                     f"| {'fake' if r['uses_fake'] else 'real'} |")
    table = "\n".join(lines)
    print(table)
    meta = {"FAKE_MIN_WORK": cv.FAKE_MIN_WORK, "reps": args.reps, "load_average": list(os.getloadavg()),
            "threads": 1, "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, OUT.with_suffix(".json"))
    tmp = OUT.with_suffix(".md.tmp")
    tmp.write_text(f"# binarize: FakeTensor vs real example input (process CPU s, median of {args.reps}, "
                   f"load average {os.getloadavg()[0]:.1f})\n\n{table}\n\n"
                   "    python benchmarks/bench_fake_input.py\n")
    os.replace(tmp, OUT.with_suffix(".md"))


if __name__ == "__main__":
    main()
