"""Export benchmark on Spikformer-4-384 (CIFAR, T=4, the zoo default of spikformer_cifar), BESTformer recipe.

For each format: export + verification seconds, largest output difference against PyTorch, spikes that differ,
and the file size against the fp32 checkpoint (torch.save of the full-precision state_dict). For FINN: the
coverage totals of its front-end (which nodes become hardware layers and why the others do not).

The weights are random, but not a fresh initialisation: a fresh network is silent (no neuron fires, which would
make the spike checks and the export trivially exact), so the BatchNorms are re-estimated on random inputs to
make about a fifth of the neurons fire, and every full-precision tensor gets a little noise so that it does not
compress better than trained weights would.

FINN (`--formats finn`): the FINN-ready graph through FINN+'s front-end, every stage executed against PyTorch.
qonnx's lookups scan lists (quadratic transforms); the pipeline answers them from checked maps (finn_index.py),
which made the full 4-block, T=4 graph practical. Without a FINN flag the coverage is measured on a one-block,
T=2 Spikformer-384; --finn-tiny runs the zoo tiny configs of spikformer_seq and spikformer_cifar, --finn-default
their default configs (spikformer_cifar's is the full Spikformer-4-384, T=4), --finn-full the full model as
(4, 4). Each FINN run is a child process under --finn-timeout; a FINN-only run keeps the other formats' figures
and the FINN runs it did not repeat in export.json.

The qonnx and onnx exports share one traced graph (`export_all`); its tracing time is reported on its own row
and counted in the first format's row. Wall seconds and this process's CPU seconds are both reported (1 thread
for torch and for qonnx's per-node runtime): on a machine other jobs share, the CPU seconds are the figure that
does not depend on the load. Verification runs neuron by neuron (every neuron fed PyTorch's spikes, so rounding
ties are counted, not cascaded). `--deep` adds the same measurement on a 22-block Spikformer (136 binary layers,
width 128), the size class of Meta-SpikeFormer (~140 binary layers), for the "export + verify under 60 s" target.

    python benchmarks/bench_export.py [--formats qonnx,onnx,packed,finn] [--deep] [--finn-full --finn-timeout 3600]
    python benchmarks/bench_export.py --formats finn --finn-tiny --finn-samples 2
    python benchmarks/bench_export.py --formats finn --finn-tiny --finn-default --finn-samples 2

Writes benchmarks/results/export.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bestcompress.convert import binarize  # noqa: E402
from bestcompress.exporters import export_all  # noqa: E402
from bestcompress.nn.calibrate import make_it_fire  # noqa: E402
from bestcompress.nn.binary import is_binary_layer  # noqa: E402
from bestcompress.zoo import create_model, get_entry  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "export.json"


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


def build(depths: int = 4, T: int = 4, **kwargs):
    torch.manual_seed(0)
    source = create_model("spikformer_cifar", depths=depths, T=T, **kwargs).eval()
    t0 = time.perf_counter()
    binary = binarize(source, "bestformer").model
    seconds = time.perf_counter() - t0
    make_it_fire(binary, binary.bc_input_shape)
    trained_like(binary)
    return source, binary, seconds


def build_tiny(arch: str, default: bool = False, recipe: str = "bestformer"):
    """The zoo's tiny (or, with `default`, default) configuration of `arch`, binarized with `recipe` and made to
    fire like a trained model (make_it_fire also sets quantized streams' grids, recipe bestformer_finn)."""
    torch.manual_seed(0)
    source = create_model(arch, **({} if default else get_entry(arch).tiny_cfg)).eval()
    binary = binarize(source, recipe).model
    make_it_fire(binary, binary.bc_input_shape)
    trained_like(binary)
    return binary


def _finn_child(spec, out: str, samples, queue) -> None:
    torch.set_num_threads(1)
    try:
        if isinstance(spec, str):  # a zoo name: its tiny config; "<name>@default": its default config; "#recipe"
            spec, _, recipe = spec.partition("#")
            binary = build_tiny(spec.split("@")[0], default=spec.endswith("@default"), recipe=recipe or "bestformer")
        else:
            binary = build(*spec)[1]
        from bestcompress.exporters import finn as finn_format
        from bestcompress.model_facts import example_input_for

        t0, c0 = time.perf_counter(), time.process_time()
        tag = spec if isinstance(spec, str) else f"{spec[0]}-384 T={spec[1]}"
        # not strict: a stage whose check fails is recorded (its coverage and timings still measured)
        _, report, verification = finn_format.export_finn(
            binary, example_input_for(binary, None, batch=1, seed=0), out, samples=samples, strict=False,
            progress=lambda line: print(f"[{tag} {time.perf_counter() - t0:7.1f} s] {line}", file=sys.stderr,
                                        flush=True))  # one line per FINN transform, on stderr
        slowest = sorted(finn_format.TIMES.items(), key=lambda kv: -kv[1])[:8]
        keys = ("totals", "stages", "notes", "binary_mac_fraction_in_hw", "nodes_total", "nodes_hw")
        queue.put({"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
                   "load_average": [round(v, 1) for v in os.getloadavg()],
                   "transforms_total_s": round(sum(finn_format.TIMES.values()), 1),
                   "max_abs_diff": verification.max_abs_diff,
                   "passed": all(v["passed"] for v in report["verification"].values()),
                   "stage_checks": {k: {"passed": v["passed"], "max_abs_diff": v.get("max_abs_diff"),
                                        "stepwise": v.get("stepwise"), "ties": v.get("ties"),
                                        **({"end_to_end": v["end_to_end"]} if "end_to_end" in v else {})}
                                    for k, v in report["verification"].items()},
                   "samples": verification.samples, "neurons_checked": len(verification.neurons),
                   "slowest_transforms_s": {k: round(v, 1) for k, v in slowest},
                   "seconds_front_end": report["seconds"], "cpu_seconds_front_end": report["cpu_seconds"],
                   **{k: report[k] for k in keys}})
    except Exception as e:  # report, do not crash the benchmark
        queue.put({"error": f"{type(e).__name__}: {str(e)[:300]}"})


def run_finn(spec, timeout: float, tmp: Path, samples=None) -> dict:
    """FINN export of `spec` (a zoo name: its tiny config; or (depths, T) of Spikformer-384) in a child process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    tag = spec.replace("@", "_").replace("#", "_") if isinstance(spec, str) else f"d{spec[0]}_t{spec[1]}"
    proc = ctx.Process(target=_finn_child, args=(spec, str(tmp / f"finn_{tag}"), samples, queue))
    t0 = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return {"error": f"timed out after {timeout:.0f} s", "seconds": round(time.perf_counter() - t0, 1)}
    return queue.get() if not queue.empty() else {"error": f"child exited with code {proc.exitcode}"}


def measure(binary: nn.Module, formats: list[str], tmp: Path, fp32_size: int, tag: str) -> tuple[dict, list]:
    """Export + verify `binary` to each format (qonnx and onnx share one trace); {format: entry}, table rows."""
    suffix = {"qonnx": ".onnx", "onnx": ".std.onnx", "packed": ".bcz"}
    marks: list[tuple[str, float]] = []  # (progress line, CPU seconds of this process so far)
    c0 = time.process_time()
    results = export_all(binary, {f: tmp / f"{tag}{suffix[f]}" for f in formats},
                         progress=lambda line: marks.append((line, time.process_time() - c0)))
    c_end = time.process_time() - c0
    starts = [(line.split(":")[0], c) for line, c in marks if line.split(":")[0] in formats and "writing" in line]
    cpu = {fmt: (starts[i + 1][1] if i + 1 < len(starts) else c_end) - (0.0 if i == 0 else c)
           for i, (fmt, c) in enumerate(starts)}  # the first format's CPU time includes the shared trace
    trace_cpu = starts[0][1] if starts else 0.0
    out, rows = {}, []
    if any(f in ("qonnx", "onnx") for f in formats):
        out["trace_cpu_seconds"] = round(trace_cpu, 2)
        rows.append([f"{tag}: trace (shared)", "-", f"{trace_cpu:.1f}", "-", "-", "-", "-", "-"])
    for fmt, r in results.items():
        v = r.verification
        out[fmt] = {"seconds": round(r.seconds, 2), "cpu_seconds": round(cpu.get(fmt, 0.0), 2), "bytes": r.bytes,
                    "ratio_vs_fp32_checkpoint": fp32_size / r.bytes,
                    "max_abs_diff": v.max_abs_diff, "flipped_fraction": v.flipped_fraction, "ties": v.ties,
                    "stepwise": v.stepwise, "neurons": len(v.neurons), "samples": v.samples, "runtime": v.runtime,
                    "passed": v.passed, "verify_seconds": round(v.seconds, 2)}
        rows.append([f"{tag}: {fmt}", f"{r.seconds:.1f}", f"{cpu.get(fmt, 0.0):.1f}", f"{v.seconds:.1f}",
                     f"{v.max_abs_diff:.2g}",
                     f"{100 * v.flipped_fraction:.3g} % ({v.ties} ties)", f"{r.bytes / 1e6:.2f}",
                     f"{fp32_size / r.bytes:.1f}x"])
        print(f"{tag} {fmt}: {r.seconds:.1f} s, {v.message()}", flush=True)
    out["total_seconds"] = round(sum(r.seconds for r in results.values()), 2)
    out["total_cpu_seconds"] = round(c_end, 2)
    return out, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="qonnx,onnx,packed,finn")
    ap.add_argument("--deep", action="store_true", help="also measure a 22-block (136 binary layers) Spikformer")
    ap.add_argument("--finn-full", action="store_true", help="also run FINN on the full 4-block, T=4 model")
    ap.add_argument("--finn-timeout", type=float, default=3600.0, help="seconds allowed for each FINN run")
    ap.add_argument("--finn-tiny", action="store_true",
                    help="run FINN on the zoo tiny configs of spikformer_seq and spikformer_cifar (the fast setting) "
                         "instead of Spikformer-384 with 1 block, T=2")
    ap.add_argument("--finn-default", action="store_true",
                    help="run FINN on the zoo default configs of spikformer_seq (2-64, T=4) and spikformer_cifar "
                         "(Spikformer-4-384, T=4: the full model); with --finn-tiny, on both")
    ap.add_argument("--finn-archs", default="spikformer_seq,spikformer_cifar",
                    help="the zoo models of --finn-tiny / --finn-default")
    ap.add_argument("--finn-samples", type=int, default=None, help="verification samples for FINN (default 4)")
    ap.add_argument("--recipe", default="bestformer",
                    help="the recipe of the --finn-tiny / --finn-default models (e.g. bestformer_finn: quantized "
                         "coupled streams); rows of another recipe are keyed '<model> <config> (<recipe>)'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    graph_formats = [f for f in formats if f != "finn"]

    source, binary, bin_seconds = build()
    n_params = sum(p.numel() for p in source.parameters())
    n_binary = sum(m.weight.numel() for m in binary.modules() if is_binary_layer(m))
    results = {"model": "spikformer_cifar 4-384, T=4, 32x32, recipe bestformer (reversible couplings on)",
               "params": n_params, "binary_weights": n_binary, "binarize_seconds": round(bin_seconds, 2),
               "threads": 1, "formats": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_export_") as d:
        tmp = Path(d)
        fp32_ckpt = tmp / "fp32.pt"
        torch.save(source.state_dict(), fp32_ckpt)
        fp32_size = fp32_ckpt.stat().st_size
        results["fp32_checkpoint_bytes"] = fp32_size
        if graph_formats:
            results["formats"], rows = measure(binary, graph_formats, tmp, fp32_size, "4-384")
        if args.deep:
            deep_src, deep, _ = build(depths=22, embed_dims=128)
            layers = sum(is_binary_layer(m) for m in deep.modules())
            torch.save(deep_src.state_dict(), tmp / "deep.pt")
            deep_res, deep_rows = measure(deep, graph_formats, tmp, (tmp / "deep.pt").stat().st_size, "22-128")
            results["deep"] = {"model": "spikformer_cifar 22-128, T=4, 32x32, recipe bestformer",
                               "binary_layers": layers, **deep_res}
            rows += deep_rows
        if "finn" in formats:
            archs = [a.strip() for a in args.finn_archs.split(",") if a.strip()]
            label, suffix = ("", "") if args.recipe == "bestformer" else (f" ({args.recipe})", f"#{args.recipe}")
            specs = {f"{a} tiny{label}": a + suffix for a in archs} if args.finn_tiny else {}
            if args.finn_default:
                specs.update({f"{a} default{label}": f"{a}@default{suffix}" for a in archs})
            if not specs:
                specs = {"1 block, T=2": (1, 2)}
            if args.finn_full:
                specs["full"] = (4, 4)
            finn = {}
            for key, spec in specs.items():
                finn[key] = run_finn(spec, args.finn_timeout, tmp, args.finn_samples)
                print(f"finn ({key}): {finn[key].get('totals', finn[key])}", flush=True)
            results["formats"]["finn"] = finn
            for key, f in finn.items():
                if "totals" in f:
                    t = f["totals"]
                    rows.append([f"finn ({key})", f"{f['seconds']:.0f}", "-", "-", f"{f['max_abs_diff']:.2g}", "-",
                                 "-", f"{t['hw']}/{t['nodes']} nodes to hw layers, "
                                 f"{100 * t['binary_mac_fraction_in_hw']:.1f} % of 1-bit MACs in MVAU/VVAU"])
                else:
                    rows.append([f"finn ({key})", str(f.get("seconds", "-")), "-", "-", "-", "-", "-",
                                 f["error"][:40]])
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    headers = ["model: format", "export+verify s (wall)", "CPU s", "verify s (wall)", "max abs diff", "spikes differ",
               "MB", "vs fp32 ckpt"]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    print(f"\nSpikformer-4-384 CIFAR: {n_params / 1e6:.3f} M params, {n_binary / 1e6:.3f} M binary; "
          f"fp32 checkpoint {fp32_size / 1e6:.2f} MB; 1 thread; peak RSS {results['peak_rss_mb']:.0f} MB")
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
    if not graph_formats and RESULTS.is_file():  # a FINN-only run keeps the other formats' (and runs') figures
        kept = json.loads(RESULTS.read_text())
        kept.setdefault("formats", {}).setdefault("finn", {}).update(results["formats"].get("finn", {}))
        results = kept
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"\nsaved {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
