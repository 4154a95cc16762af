"""Export benchmark on Spikformer-4-384 (CIFAR, T=4, the zoo default of spikformer_cifar), BESTformer recipe.

For each format: export + verification seconds, largest output difference against PyTorch, spikes that differ,
and the file size against the fp32 checkpoint (torch.save of the full-precision state_dict). For FINN: the
coverage totals of its front-end (which nodes become hardware layers and why the others do not).

The weights are random, but not a fresh initialisation: a fresh network is silent (no neuron fires, which would
make the spike checks and the export trivially exact), so the BatchNorms are re-estimated on random inputs to
make about a fifth of the neurons fire, and every full-precision tensor gets a little noise so that it does not
compress better than trained weights would.

FINN+'s transformations scan the whole graph for every node they touch (quadratic or worse): its front-end takes
~6.5 min on a one-block, T=2 Spikformer-384 (374 nodes) on a 2-core machine, and would take hours on the full
4-block, T=4 graph (~2000 nodes). The coverage is therefore measured on that one-block, T=2 model (full width
and input size; every block is identical, so the per-node verdicts are the same kinds and the totals scale with
depth and T). --finn-full also tries the full model in a child process under --finn-timeout.

    python benchmarks/bench_export.py [--formats qonnx,onnx,packed,finn] [--finn-full --finn-timeout 3600]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bestcompress.convert import binarize  # noqa: E402
from bestcompress.exporters import export_model  # noqa: E402
from bestcompress.nn.calibrate import make_it_fire  # noqa: E402
from bestcompress.nn.binary import is_binary_layer  # noqa: E402
from bestcompress.zoo import create_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_export.json"


def trained_like(model: nn.Module) -> None:
    """Relative noise on every full-precision float tensor, so its bytes are as incompressible as trained ones
    (the never-used LayerNorms of the public Spikformer stay at their constant initial values, as in training)."""
    binary_weights = {f"{n}.weight" for n, m in model.named_modules() if is_binary_layer(m)}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name in binary_weights or not t.is_floating_point() or ".norm" in name:
                continue
            t.add_(torch.randn(t.shape, generator=g) * (0.01 * t.abs() + 1e-3))
            if name.endswith("running_var"):
                t.clamp_(min=1e-3)


def build(depths: int = 4, T: int = 4):
    torch.manual_seed(0)
    source = create_model("spikformer_cifar", depths=depths, T=T).eval()
    t0 = time.perf_counter()
    binary = binarize(source, "bestformer").model
    seconds = time.perf_counter() - t0
    make_it_fire(binary, binary.bc_input_shape)
    trained_like(binary)
    return source, binary, seconds


def _finn_child(depths: int, T: int, out: str, queue) -> None:
    torch.set_num_threads(1)
    try:
        _, binary, _ = build(depths, T)
        t0 = time.perf_counter()
        result = export_model(binary, "finn", out)
        queue.put({"seconds": round(time.perf_counter() - t0, 1), "max_abs_diff": result.verification.max_abs_diff,
                   "passed": result.verification.passed, **result.extra["finn"]})
    except Exception as e:  # report, do not crash the benchmark
        queue.put({"error": f"{type(e).__name__}: {str(e)[:300]}"})


def run_finn(depths: int, T: int, timeout: float, tmp: Path) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_finn_child, args=(depths, T, str(tmp / f"finn_d{depths}_t{T}"), queue))
    t0 = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return {"error": f"timed out after {timeout:.0f} s", "seconds": round(time.perf_counter() - t0, 1)}
    return queue.get() if not queue.empty() else {"error": f"child exited with code {proc.exitcode}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="qonnx,onnx,packed,finn")
    ap.add_argument("--finn-full", action="store_true", help="also run FINN on the full 4-block, T=4 model")
    ap.add_argument("--finn-timeout", type=float, default=3600.0, help="seconds allowed for each FINN run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]

    source, binary, bin_seconds = build()
    n_params = sum(p.numel() for p in source.parameters())
    n_binary = sum(m.weight.numel() for m in binary.modules() if is_binary_layer(m))
    results = {"model": "spikformer_cifar 4-384, T=4, 32x32, recipe bestformer (reversible couplings on)",
               "params": n_params, "binary_weights": n_binary, "binarize_seconds": round(bin_seconds, 2),
               "formats": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_export_") as d:
        tmp = Path(d)
        fp32_ckpt = tmp / "fp32.pt"
        torch.save(source.state_dict(), fp32_ckpt)
        fp32_size = fp32_ckpt.stat().st_size
        results["fp32_checkpoint_bytes"] = fp32_size
        for fmt in formats:
            if fmt == "finn":
                continue
            suffix = {"qonnx": ".onnx", "onnx": ".std.onnx", "packed": ".bcz"}[fmt]
            r = export_model(binary, fmt, tmp / f"model{suffix}")
            v = r.verification
            entry = {"seconds": round(r.seconds, 2), "bytes": r.bytes, "ratio_vs_fp32_checkpoint": fp32_size / r.bytes,
                     "max_abs_diff": v.max_abs_diff, "flipped_fraction": v.flipped_fraction,
                     "neurons": len(v.neurons), "samples": v.samples, "runtime": v.runtime, "passed": v.passed}
            results["formats"][fmt] = entry
            rows.append([fmt, f"{r.seconds:.1f}", f"{v.max_abs_diff:.2g}", f"{100 * v.flipped_fraction:.3g} %",
                         f"{r.bytes / 1e6:.2f}", f"{fp32_size / r.bytes:.1f}x"])
            print(f"{fmt}: {r.seconds:.1f} s, {v.message()}", flush=True)
        if "finn" in formats:
            finn = {"1 block, T=2": run_finn(1, 2, args.finn_timeout, tmp)}
            print(f"finn (1 block, T=2): {finn['1 block, T=2'].get('totals', finn['1 block, T=2'])}", flush=True)
            if args.finn_full:
                finn["full"] = run_finn(4, 4, args.finn_timeout, tmp)
                print(f"finn (4 blocks): {finn['full'].get('totals', finn['full'])}", flush=True)
            results["formats"]["finn"] = finn
            for key, f in finn.items():
                if "totals" in f:
                    t = f["totals"]
                    rows.append([f"finn ({key})", f"{f['seconds']:.0f}", f"{f['max_abs_diff']:.2g}", "-",
                                 "-", f"{t['hw']}/{t['nodes']} nodes to hw layers"])
                else:
                    rows.append([f"finn ({key})", str(f.get("seconds", "-")), "-", "-", "-", f["error"][:40]])

    headers = ["format", "export+verify s", "max abs diff", "spikes differ", "MB", "vs fp32 ckpt"]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    print(f"\nSpikformer-4-384 CIFAR: {n_params / 1e6:.3f} M params, {n_binary / 1e6:.3f} M binary; "
          f"fp32 checkpoint {fp32_size / 1e6:.2f} MB")
    for r in [headers, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    finn = results["formats"].get("finn", {})
    for key, f in finn.items():
        if "totals" in f:
            w = f["totals"]["binary_weight_layers"]
            print(f"\nFINN coverage ({key}): {f['totals']['hw']} of {f['totals']['nodes']} nodes became hardware "
                  f"layers; 1-bit-weight matrix layers on MVAU/VVAU: {w['mvau']} of {w['mvau'] + w['not_mapped']}")
            for layer, n in f["totals"]["by_layer"].items():
                print(f"  {n:>5}  {layer}")
            for reason, n in f["totals"]["by_reason"].items():
                print(f"  {n:>5}  not mapped: {reason}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"\nsaved {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
