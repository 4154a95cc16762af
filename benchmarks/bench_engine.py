"""The 1-bit engine against fp32 PyTorch: per binary layer, and the whole model at batch 1 and 32.

Builds Spikformer-4-384 T=4 (`spikformer_cifar`, 32 px), binarizes it with the bestformer recipe, calibrates the
BatchNorms of both so that the neurons fire (make_it_fire), and measures, interleaved in one process (A B A B ...,
process CPU time, one torch thread; the engine's kernels are single-threaded too):
  - per binary layer: that layer in the engine on the input it really receives (spikes, or the residual stream's
    few bit planes) vs an fp32 torch Conv2d/Linear of the same shape on the same input (followed by the model's
    BatchNorm in both when the engine folded it into the layer). Warm caches for both sides: every timed call
    follows an untimed call of the same side on the same input (A A B B ..., the second of each pair timed), so
    neither side pays for the other's cache footprint (the fp32 layer's weights and buffers evict the engine's
    scratch, and the CPU runs slower right after its AVX-512 work). The median of the plain A B A B timing, where
    each side runs right after the other, is recorded too (layer_speedup_median_after_other);
  - the whole model: fp32 PyTorch (the full-precision source model, same architecture) vs the engine, and the
    binary PyTorch model for reference, at batch 1 and 32;
  - weight memory: the engine's packed words vs the sign bits vs the fp32 weights of the binary layers.
The engine is checked spike-exact against the binary PyTorch model first. Ratios are fp32 time ÷ engine time.
The engine runs its default kernels (the popcount variant this CPU has; on a CPU with AMX, linear layers and
convolutions on the int8 matrix units, --int8 to choose); each layer is also timed on popcounts only
(--int8 off) and, with AMX, with every layer they take on the int8 units (--int8 all: linear layers, and
convolutions whose output rows are groups of 16 columns) and with --int8 multi, so the table says what each
route gives.
Results: benchmarks/results/engine.json (keys layer_speedup_median, model_speedup_b1, model_speedup_b32; also
layer_speedup_median_spike_inputs: the same layers fed 0/1 spikes, what the kernels do on pure spike inputs,
layer_speedup_median_after_other: A B A B without the warm-up pairs,
layer_speedup_median_popcount_only, layer_speedup_median_int8_all, layer_speedup_median_int8_multi) and engine.md.

    python benchmarks/bench_engine.py [--reps 7] [--layer-reps 25] [--reps-b32 3] [--arch spikformer_cifar]
                                      [--int8 all]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from bestcompress import engine as E
from bestcompress.convert import binarize
from bestcompress.engine import kernels
from bestcompress.engine.layers import PackedConv
from bestcompress.nn.binary import is_binary_layer
from bestcompress.nn.calibrate import make_it_fire
from bestcompress.zoo import create_model

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"layer_speedup_median": 8.0, "model_speedup_b1": 3.0}


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return out


def interleaved(fns: dict, reps: int, warm: bool = False) -> dict[str, float]:
    """Median CPU seconds of each callable, measured A B C A B C ... after one warm-up each; with `warm`, each timed
    call follows an untimed one of the same callable (A A B B C C ..., the second of each pair timed)."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if warm:
                f()
            times[k] += cpu_seconds(f, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def fp32_twin(layer: nn.Module) -> nn.Module:
    """An fp32 torch layer of the binary layer's shape (random weights: the time does not depend on them)."""
    if isinstance(layer, nn.Linear):
        twin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        cls = nn.Conv2d if layer.weight.dim() == 4 else nn.Conv1d
        twin = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                   layer.dilation, layer.groups, bias=layer.bias is not None)
    return twin.eval()


class WithBatchNorm(nn.Module):
    """The fp32 twin followed by the BatchNorm the engine folded into that layer, in the model's layout."""

    def __init__(self, layer: nn.Module, bn: nn.Module, transposed: bool) -> None:
        super().__init__()
        self.layer, self.bn, self.transposed = layer, bn, transposed

    def forward(self, x):
        y = self.layer(x)
        return self.bn(y.transpose(-1, -2)).transpose(-1, -2) if self.transposed else self.bn(y)


def layer_inputs(engine, x) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(mod, args, out):
            seen.setdefault(name, args[0].detach().clone())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in engine.packed_layers().items()]
    try:
        engine(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="spikformer_cifar")
    parser.add_argument("--recipe", default="bestformer")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions of the whole model at batch 1")
    parser.add_argument("--layer-reps", type=int, default=25,
                        help="interleaved repetitions per layer and route (a layer call takes 0.05-10 ms: many reps "
                             "keep the median steady on a shared CPU)")
    parser.add_argument("--reps-b32", type=int, default=3, help="interleaved repetitions at batch 32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--int8", choices=kernels.INT8_MODES, default=None,
                        help="linear layers on the int8 matrix units (AMX): off, multi (inputs of several bit "
                             "planes), all (the default)")
    args = parser.parse_args()
    with kernels.use_kernels(int8=args.int8) if kernels.compiled_available() else contextlib.nullcontext():
        run(args)


def _route_speedups(twin, ours, x, reps: int) -> dict[str, float]:
    """fp32 ÷ engine on x with popcounts only, and (with AMX) with int8 'all' and 'multi'."""
    out = {}
    amx = kernels.compiled_available() and bool(kernels._ext.amx_available())
    routes = [("popcount_only", "off")] + ([("int8_all", "all"), ("int8_multi", "multi")] if amx else [])
    for label, mode in routes:
        with kernels.use_kernels(int8=mode):
            t = interleaved({"fp32": lambda: twin(x), "engine": lambda: ours(x)}, reps, warm=True)
        out[label] = t["fp32"] / t["engine"]
    return out


def run(args) -> None:
    load_before = os.getloadavg()  # the CPU is shared: other jobs' load shifts both timings and their ratio
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    fp = create_model(args.arch).eval()
    binary = binarize(fp, args.recipe).model
    shape = tuple(binary.bc_input_shape)
    make_it_fire(binary, shape)
    make_it_fire(fp, shape)
    engine = E.from_model(binary)
    g = torch.Generator().manual_seed(1)
    x1, x32 = torch.rand((1,) + shape, generator=g), torch.rand((32,) + shape, generator=g)

    report = E.verify(engine, binary, samples=2, batch=1)
    print(report.message())

    layers = dict((n, m) for n, m in binary.named_modules() if is_binary_layer(m))
    packed = engine.packed_layers()
    rows = []
    with torch.no_grad():
        inputs = layer_inputs(engine, x1)
        folds = dict(f.split(" + ") for f in engine.plan.folded)
        for name, x in inputs.items():
            twin, ours = fp32_twin(layers[name]), packed[name]
            if ours.bn is not None:  # compare like with like: the engine's layer includes its BatchNorm
                twin = WithBatchNorm(twin, binary.get_submodule(folds[name]), ours.bn_transposed).eval()
            t = interleaved({"fp32": lambda: twin(x), "engine": lambda: ours(x)}, args.layer_reps, warm=True)
            planes = ours.last_planes
            ta = interleaved({"fp32": lambda: twin(x), "engine": lambda: ours(x)}, args.layer_reps)  # A B A B
            spikes = (torch.rand(x.shape, generator=g) < 0.2).to(torch.float32)  # what a spike-fed layer sees
            ts = interleaved({"fp32": lambda: twin(spikes), "engine": lambda: ours(spikes)}, args.layer_reps, warm=True)
            kind = "conv" if isinstance(ours, PackedConv) else "linear"
            ours(x)
            route = ours.last_kernel
            routes = _route_speedups(twin, ours, x, args.layer_reps) if kernels.backend() == "compiled" else {}
            rows.append({"layer": name, "kind": kind, "input": list(x.shape), "planes": planes, "kernel": route,
                         "fp32_ms": 1e3 * t["fp32"], "engine_ms": 1e3 * t["engine"],
                         "speedup": t["fp32"] / t["engine"], "speedup_spike_input": ts["fp32"] / ts["engine"],
                         "speedup_after_other": ta["fp32"] / ta["engine"],
                         **{f"speedup_{k}": v for k, v in routes.items()}})
            print(f"{name:28s} {kind:6s} {str(list(x.shape)):20s} planes {planes} {route:8s} fp32 "
                  f"{1e3 * t['fp32']:7.3f} ms  engine {1e3 * t['engine']:7.3f} ms  {t['fp32'] / t['engine']:5.2f}x"
                  f"  (after the other {ta['fp32'] / ta['engine']:5.2f}x; "
                  f"on 0/1 spikes {ts['fp32'] / ts['engine']:5.2f}x; "
                  + ", ".join(f"{k} {v:5.2f}x" for k, v in routes.items()) + ")")

        whole = {}
        for label, x, reps in (("b1", x1, args.reps), ("b32", x32, args.reps_b32)):
            t = interleaved({"fp32": lambda: fp(x), "engine": lambda: engine(x), "binary_torch": lambda: binary(x)},
                            reps)
            whole[label] = {k + "_ms": 1e3 * v for k, v in t.items()}
            whole[label]["speedup"] = t["fp32"] / t["engine"]
            whole[label]["speedup_vs_binary_torch"] = t["binary_torch"] / t["engine"]
            print(f"whole model {label}: fp32 {1e3 * t['fp32']:.1f} ms, engine {1e3 * t['engine']:.1f} ms, binary "
                  f"PyTorch {1e3 * t['binary_torch']:.1f} ms: {t['fp32'] / t['engine']:.2f}x faster than fp32")
            if label == "b1" and kernels.backend() == "compiled" and kernels.int8_units() != "off":
                with kernels.use_kernels(int8="off"):
                    tp = interleaved({"fp32": lambda: fp(x), "engine": lambda: engine(x)}, reps)
                whole[label]["speedup_popcount_only"] = tp["fp32"] / tp["engine"]
                print(f"whole model b1 on popcounts only: {tp['fp32'] / tp['engine']:.2f}x faster than fp32")

    mem = engine.memory()
    fp32_weight_bytes = sum(m.weight.numel() * 4 for m in layers.values())
    speedups = sorted(r["speedup"] for r in rows)
    result = {
        "arch": args.arch, "recipe": args.recipe, "input_shape": list(shape), "threads": args.threads,
        "reps": {"layer": args.layer_reps, "b1": args.reps, "b32": args.reps_b32},
        "backend": E.backend_description(), "machine": platform.processor() or platform.machine(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "spike_exact": report.passed, "verify": report.to_dict(),
        "layer_speedup_median": statistics.median(speedups), "layer_speedup_min": speedups[0],
        "layer_speedup_max": speedups[-1],
        "layer_speedup_median_spike_inputs": statistics.median(r["speedup_spike_input"] for r in rows),
        "layer_speedup_median_after_other": statistics.median(r["speedup_after_other"] for r in rows),
        **{f"layer_speedup_median_{k}": statistics.median(r[f"speedup_{k}"] for r in rows)
           for k in ("popcount_only", "int8_all", "int8_multi") if rows and f"speedup_{k}" in rows[0]},
        "kernels": {"isa": kernels.isa(), "int8": kernels.int8_units(),
                    "amx_available": kernels.int8_units() != "off" or (
                        kernels.compiled_available() and bool(kernels._ext.amx_available())),
                    "layers_on_int8_units": sum(r["kernel"] == "int8" for r in rows)},
        "model_speedup_b1": whole["b1"]["speedup"],
        "model_speedup_b32": whole["b32"]["speedup"], "whole_model": whole, "layers": rows,
        "memory": {**mem, "binary_layers_fp32_weight_bytes": fp32_weight_bytes}, "targets": TARGETS,
        "method": "median process CPU time, torch.set_num_threads(threads), engine kernels single-threaded (no "
                  "multithreading in the engine); per layer: fp32 = an fp32 torch layer of the same shape (plus the "
                  "BatchNorm the engine folded) on the same input, warm caches for both sides (A A B B, the second "
                  "call of each pair timed; layer_speedup_median_after_other: plain A B A B, each side right after "
                  "the other); whole model: fp32 = the full-precision source model, interleaved A B A B",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# 1-bit engine vs fp32 PyTorch", "",
             f"{args.arch} ({args.recipe}), input {list(shape)}, {args.threads} thread(s), {result['cpu']}, "
             f"{E.backend_description()}; "
             f"spike-exact: {report.passed}. Median process CPU time; per layer warm caches for both sides (A A B B, "
             f"the second of each pair timed), whole model interleaved A B A B; load average "
             f"{result['load_average_before_after'][0]:.1f} before, {result['load_average_before_after'][1]:.1f} after "
             f"on {os.cpu_count()} CPUs.", "",
             "| measure | fp32 PyTorch | engine | speed-up | target |", "|---|---|---|---|---|",
             f"| binary layers (median of {len(rows)}) | | | {result['layer_speedup_median']:.2f}× "
             f"(min {speedups[0]:.2f}×, max {speedups[-1]:.2f}×) | ≥ 8× |",
             f"| binary layers on 0/1 spike inputs of the same shapes (median) | | | "
             f"{result['layer_speedup_median_spike_inputs']:.2f}× | |",
             f"| binary layers, each side timed right after the other (A B A B, median) | | | "
             f"{result['layer_speedup_median_after_other']:.2f}× | |"]
    for key, label in (("popcount_only", "popcounts only (--int8 off)"),
                       ("int8_all", "every layer the AMX int8 tiles take on them (--int8 all)"),
                       ("int8_multi", "convolutions and spike-fed linears on popcounts, the other linears on AMX "
                                      "(--int8 multi)")):
        if f"layer_speedup_median_{key}" in result:
            lines.append(f"| binary layers, {label} (median) | | | {result[f'layer_speedup_median_{key}']:.2f}× | |")
    for label in ("b1", "b32"):
        w = whole[label]
        lines.append(f"| whole model, batch {label[1:]} | {w['fp32_ms']:.1f} ms | {w['engine_ms']:.1f} ms | "
                     f"{w['speedup']:.2f}× | {'≥ 3×' if label == 'b1' else ''} |")
        if "speedup_popcount_only" in w:
            lines.append(f"| whole model, batch 1, popcounts only | | | {w['speedup_popcount_only']:.2f}× | |")
    lines += ["", f"Weight memory of the binary layers: fp32 {fp32_weight_bytes / 1e6:.2f} MB, sign bits "
              f"{mem['sign_bit_bytes'] / 1e6:.3f} MB, engine in RAM {mem['packed_weight_bytes'] / 1e6:.3f} MB "
              "(bits in 64-bit words per channel group, plus biases).", "",
              f"Kernels: popcount variant {kernels.isa()}, int8 matrix units: {kernels.int8_units()} "
              f"({result['kernels']['layers_on_int8_units']} of {len(rows)} layers ran on them). "
              "Per layer, on the input it really receives (bit planes: 1 for spikes, more for the residual stream "
              "of spike sums), the kernel that computed it, and on 0/1 spikes of the same shape:", "",
              "| layer | input | bit planes | kernel | fp32 ms | engine ms | speed-up | after the other "
              "| on 0/1 spikes | popcounts only | all on int8 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    na = "–"
    lines += [f"| {r['layer']} | {r['input']} | {r['planes']} | {r['kernel']} | {r['fp32_ms']:.3f} | "
              f"{r['engine_ms']:.3f} | {r['speedup']:.2f}× | {r['speedup_after_other']:.2f}× | "
              f"{r['speedup_spike_input']:.2f}× | "
              + (f"{r['speedup_popcount_only']:.2f}×" if "speedup_popcount_only" in r else na) + " | "
              + (f"{r['speedup_int8_all']:.2f}×" if "speedup_int8_all" in r else na) + " |" for r in rows]
    (RESULTS / "engine.md").write_text("\n".join(lines) + "\n")
    print(f"layer speed-up median {result['layer_speedup_median']:.2f}x, whole model b1 "
          f"{result['model_speedup_b1']:.2f}x, b32 {result['model_speedup_b32']:.2f}x; wrote {RESULTS / 'engine.json'}")


if __name__ == "__main__":
    main()
