"""Speed and memory as ratios measured side by side in one process (issue 11's table).

Every ratio is ours ÷ theirs (lower is better; memory: plain ÷ ours, higher is better), measured interleaved
(A B A B ...) in process CPU time with one torch thread, so that other load on a shared machine hits both alike.

    python benchmarks/bench_speed.py [--repeats 5] [--official DIR [--official-shim]] [--quick]
                                     [--only step|memory|lif_gpu]

Rows:
- lif_vs_spikingjelly: LIF forward+backward, bestcompress (fused kernel) vs spikingjelly 2.0 LIFNode(step_mode='m',
  torch backend), at [T=4, B=64, 384, 64] and [T=16, B=16, 384, 64] (the JSON keeps the worse of the two);
- lif_fused_vs_plain: the same neuron through the fused kernel vs the plain per-step loop (BESTCOMPRESS_LIF=reference);
- lif_gpu (CUDA only; "skipped: no CUDA device" in details.lif_gpu otherwise): the same LIF forward+backward on the
  GPU at [T=4, B=64, 384, 64], ours (the Triton kernel, nn/lif_triton.py) vs spikingjelly's LIFNode (its torch
  loop), interleaved in GPU time by CUDA events; `--only lif_gpu` re-measures this row alone and keeps the others;
- student_vs_fp: one training step of the binary student vs the full-precision model of the same architecture
  (spikformer_cifar, dims 128, depth 2, 4 heads, T=4, batch 64; --quick: batch 16); student_bf16_vs_fp: the
  student under the opt-in train.precision bf16 (nn/bf16.py), the FP model still float32;
- infer_binary_vs_fp_b1, infer_binary_vs_fp_b32: eval forward of Spikformer-4-384 T=4 at batch 1 and 32, binary
  vs full precision;
- step_vs_official: one SGD step of our binary student vs the public BESTformer code's model of the same config
  (`--official DIR`: a checkout of github.com/CaoHLin/BESTFormer, not vendored; benchmarks/official_bestformer.py
  imports DIR/cifar/model.py and builds BESTFormer(...) -> vit_snn, dims 128, depth 2, 4 heads, T=4, batch 64;
  two heads trained on the sum of their losses, neurons reset every step). That code needs timm and spikingjelly's
  old clock_driven package (with the CUDA-only cupy backend): when missing the row is skipped with a message,
  unless `--official-shim` stands in for them (recorded under details.official.stand_ins);
  step_vs_official_bf16: the same with our student under the opt-in train.precision bf16 (the public code float32);
  step_vs_official_both_bf16: our bf16 opt-in vs the public code under torch.autocast('cpu', dtype=torch.bfloat16),
  like for like (step_vs_official stays float32 vs float32); details.official.step_vs_official_no_int_forward: our
  float32 step with nn/int_forward.py switched off, in the same interleaved run.
  The step rows run last, with large freed blocks reused as the trainer sets for CPU runs (training/alloc.py,
  process-wide: the public code shares it); the official row's figure before that setting is kept in details;
  `--only step` re-measures the step rows alone and keeps the others;
- memory_plain_over_best: bytes autograd saves in one training step of the binary student of Spikingformer-8-384
  (depth 8, T=4, batch 16; couplings in the paper's ½, ½ form), plain autograd ÷ the best train.memory mode,
  counted with saved_tensors_hooks (each storage once; `--only memory` re-measures this row alone and keeps the
  others). Each mode's figure is its peak: what the forward leaves (segment inputs, kept streams, spikes as bits)
  plus the largest segment's (or reversible sub-block's) inside, which backward holds while it recomputes that
  part. `--memory-small` measures depth 4, batch 4 instead.
Results: benchmarks/results/speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "speed.json"


def reuse_freed_memory() -> str:
    from bestcompress.training.alloc import reuse_freed_memory as reuse
    return reuse()


def interleaved(fns: dict, repeats: int, faults: dict | None = None) -> dict[str, float]:
    """Process CPU seconds per call of each function, measured A B A B ... after one warm-up call each; `faults`
    (a dict) receives each one's minor page faults per call (fresh pages the kernel maps and zeroes)."""
    for f in fns.values():
        f()
    total = dict.fromkeys(fns, 0.0)
    flt = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, f in fns.items():
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.process_time()
            f()
            total[name] += time.process_time() - t0
            flt[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
    if faults is not None:
        faults.update({k: v / repeats for k, v in flt.items()})
    return {k: v / repeats for k, v in total.items()}


def _lif_step(neuron, x, reset=None):
    def run():
        if reset:
            reset()
        xi = x.detach().requires_grad_(True)
        neuron(xi).sum().backward()
    return run


def _lif_pair():
    """(our LIF, spikingjelly 2.0's LIFNode in step_mode 'm'), the same neuron: tau 2, V_th 1, hard reset to 0,
    detached reset, sigmoid surrogate (alpha 4)."""
    from spikingjelly.activation_based import neuron, surrogate
    from bestcompress.nn.lif import LIF

    ours = LIF(tau=2.0, v_threshold=1.0, v_reset=0.0, detach_reset=True)
    sj = neuron.LIFNode(tau=2.0, step_mode="m", surrogate_function=surrogate.Sigmoid(alpha=4.0), detach_reset=True)
    return ours, sj


def _plain_lif_step(ours, x):
    """`_lif_step(ours, x)` with our plain per-step loop (BESTCOMPRESS_LIF=reference for the call)."""
    def run():
        os.environ["BESTCOMPRESS_LIF"] = "reference"
        try:
            _lif_step(ours, x)()
        finally:
            os.environ["BESTCOMPRESS_LIF"] = "auto"
    return run


def bench_lif(repeats: int) -> list[dict]:
    from bestcompress.nn.lif_kernel import lif_backend

    rows = []
    for shape in ((4, 64, 384, 64), (16, 16, 384, 64)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        ours, sj = _lif_pair()
        faults = {}
        t = interleaved({"ours": _lif_step(ours, x), "spikingjelly": _lif_step(sj, x, sj.reset),
                         "plain": _plain_lif_step(ours, x)}, repeats, faults)
        rows.append({"shape": list(shape), "backend": lif_backend()[0], "why": lif_backend()[1], "seconds": t,
                     "page_faults_per_call": faults,
                     "lif_vs_spikingjelly": t["ours"] / t["spikingjelly"],
                     "lif_fused_vs_plain": t["ours"] / t["plain"]})
    return rows


def interleaved_cuda(fns: dict, repeats: int, inner: int = 10) -> dict[str, float]:
    """GPU milliseconds per call of each function, measured A B A B ... with CUDA events (each sample `inner`
    calls) after three warm-up calls each (the first compiles and probes the Triton kernel)."""
    for f in fns.values():
        for _ in range(3):
            f()
    torch.cuda.synchronize()
    total = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, f in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                f()
            end.record()
            end.synchronize()
            total[name] += start.elapsed_time(end)
    return {k: v / (repeats * inner) for k, v in total.items()}


def bench_lif_gpu(repeats: int) -> dict:
    """LIF forward+backward on the GPU at [T=4, B=64, 384, 64]: ours (the Triton kernel when lif_backend('cuda')
    says so) vs spikingjelly 2.0's LIFNode (step_mode='m', its torch loop) and vs our plain loop."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    try:
        ours, sj = _lif_pair()
    except ImportError as e:  # a GPU machine without it (benchmarks/gpu_check.sh installs it from .whl/)
        return {"skipped": f"spikingjelly not importable ({e})"}
    from bestcompress.nn.lif_kernel import lif_backend

    x = torch.randn(4, 64, 384, 64, generator=torch.Generator().manual_seed(0)).cuda()
    os.environ["BESTCOMPRESS_LIF"] = "auto"
    backend, why = lif_backend("cuda")
    with torch.no_grad():
        sj.reset()
        same = bool(torch.equal(ours(x), sj(x)))
    t = interleaved_cuda({"ours": _lif_step(ours, x), "spikingjelly": _lif_step(sj, x, sj.reset),
                          "plain": _plain_lif_step(ours, x)}, repeats)
    return {"shape": list(x.shape), "backend": backend, "why": why, "device": torch.cuda.get_device_name(x.device),
            "ms_per_call": t, "spikes_equal_spikingjelly": same, "lif_gpu": t["ours"] / t["spikingjelly"],
            "lif_gpu_fused_vs_plain": t["ours"] / t["plain"]}


def _print_lif_gpu(row: dict) -> None:
    if "skipped" in row:
        print(f"lif_gpu: skipped: {row['skipped']}")
        return
    ms = row["ms_per_call"]
    print(f"lif_gpu {row['shape']} on {row['device']}: ours/spikingjelly {row['lif_gpu']:.3f}, fused/plain "
          f"{row['lif_gpu_fused_vs_plain']:.3f} (ms per fwd+bwd: ours {ms['ours']:.3f}, spikingjelly "
          f"{ms['spikingjelly']:.3f}, plain {ms['plain']:.3f}; {row['backend']} backend: {row['why']}; spikes "
          f"equal spikingjelly's: {row['spikes_equal_spikingjelly']})")


def main_lif_gpu(repeats: int) -> None:
    """Re-measure only the lif_gpu row and merge it into speed.json (left as it is without a CUDA device)."""
    row = bench_lif_gpu(repeats)
    _print_lif_gpu(row)
    if "skipped" in row:
        return
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    result["lif_gpu"] = row["lif_gpu"]
    result.setdefault("details", {})["lif_gpu"] = row
    _write(result)


def _spikformer(**kw):
    from bestcompress.zoo import create_model
    torch.manual_seed(0)
    return create_model("spikformer_cifar", **kw)


def bench_student_vs_fp(repeats: int, batch: int) -> dict:
    from bestcompress.convert import binarize
    fp = _spikformer(embed_dims=128, depths=2, num_heads=4, T=4)
    student = binarize(fp.eval(), "bestformer").model
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))

    def step(model):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def run():
            out = model(x)
            out = out[0] if isinstance(out, tuple) else out
            loss = torch.nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return run

    t = interleaved({"binary": step(student), "binary_bf16": _bf16(step(student)), "fp": step(fp)}, repeats)
    return {"batch": batch, "seconds": t, "student_vs_fp": t["binary"] / t["fp"],
            "student_bf16_vs_fp": t["binary_bf16"] / t["fp"], "allocator": reuse_freed_memory()}


def _train_step(model, x, y, before=None):
    """One SGD step; a model with two heads (both BESTformer codes) is trained on the sum of their losses."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run():
        model.train()
        if before is not None:
            before(model)
        out = model(x)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(torch.nn.functional.cross_entropy(o, y) for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return run


def _bf16(step):
    """The same step under the opt-in `train.precision: bf16` (what training/epoch.py wraps a step in)."""
    from bestcompress.nn.bf16 import binary_bf16

    def run():
        with binary_bf16():
            step()
    return run


def _autocast_bf16(step):
    """The same step under torch.autocast('cpu', bfloat16): the public code's own bf16 mixed precision."""
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()
    return run


def _no_int_forward(step):
    """The same float32 step with the binary convolutions' int8 forward switched off (nn/int_forward.py)."""
    from bestcompress.nn.int_forward import disabled

    def run():
        with disabled():
            step()
    return run


def _add_official_channels_last(fns: dict, build, x, y):
    """Adds the public model trained on channels-last memory (its 4-d weights and its input moved, as our binary
    convolutions train: passes/channels_last.py) to `fns`; None, or why its code does not run so."""
    import official_bestformer
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():  # its 4-d weights (Module.to(memory_format=...) refuses its 5-d parameters)
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    step = _train_step(model, x.contiguous(memory_format=torch.channels_last), y, official_bestformer.reset)
    try:
        step()
    except Exception as e:  # noqa: BLE001 - its code may need NCHW memory
        return f"does not run channels-last ({type(e).__name__}: {str(e)[:120]})"
    fns["official_channels_last"] = step
    return None


def bench_official(folder: Path, shim: bool, repeats: int, batch: int) -> dict:
    """One training step of our binary student vs the public BESTformer code, same configuration (dims 128,
    depth 2, 4 heads, T=4, CIFAR 32 px, 10 classes): {'skipped': reason} when that code cannot run here.
    Ours runs the default recipe (float32) and, as a separate figure, the opt-in train.precision bf16; the public
    code runs float32 (its own precision) in both."""
    import official_bestformer
    from bestcompress.convert import binarize
    from bestcompress.nn.bf16 import bf16_supported
    build, info = official_bestformer.load(folder, shim)
    if build is None:
        return {"skipped": info}
    try:
        official = build()
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
        theirs = _train_step(official, x, y, official_bestformer.reset)
        theirs()  # one step first: fails here, not inside the timing, if the code cannot run on this machine
    except Exception as e:  # noqa: BLE001 - the public code's own requirements (CUDA, cupy, ...)
        return {"skipped": f"the public model does not run here ({type(e).__name__}: {str(e)[:200]})"}
    fp = _spikformer(embed_dims=128, depths=2, num_heads=4, T=4)
    student = binarize(fp.eval(), "bestformer").model
    ours = _train_step(student, x, y)
    faults_before, faults = {}, {}
    before = interleaved({"binary": ours, "official": theirs}, repeats, faults_before)  # malloc as found
    malloc = reuse_freed_memory()  # what the trainer does for CPU runs (training/alloc.py): both sides share it
    fns = {"binary": ours, "binary_bf16": _bf16(ours), "official": theirs, "official_bf16": _autocast_bf16(theirs),
           "binary_no_int_forward": _no_int_forward(ours)}
    cl_note = _add_official_channels_last(fns, build, x, y)
    t = interleaved(fns, repeats, faults)
    if "official_channels_last" in t:
        cl_note = t["binary"] / t["official_channels_last"]
    params = {"binary": sum(p.numel() for p in student.parameters()),
              "official": sum(p.numel() for p in official.parameters())}
    return dict(info, batch=batch, seconds=t, parameters=params, step_vs_official=t["binary"] / t["official"],
                step_vs_official_bf16=t["binary_bf16"] / t["official"],
                step_vs_official_both_bf16=t["binary_bf16"] / t["official_bf16"],
                step_vs_official_no_int_forward=t["binary_no_int_forward"] / t["official"],
                step_vs_official_channels_last=cl_note,
                precision={"binary": "float32 (default recipe)",
                           "binary_bf16": "train.precision bf16: binary layers on bf16 products (nn/bf16.py; "
                                          f"native bf16 on this CPU: {bf16_supported()})",
                           "official": "float32",
                           "official_channels_last": "float32, the public model and input moved to channels-last "
                                                     "memory (as our binary convolutions train, weights."
                                                     "channels_last)",
                           "official_bf16": "the public code under torch.autocast('cpu', dtype=torch.bfloat16)",
                           "binary_no_int_forward": "float32 with nn/int_forward.py switched off (the step before "
                                                    "it: every convolution forward in float32)"},
                allocator=malloc, seconds_malloc_default=before, page_faults_per_step=faults,
                page_faults_per_step_malloc_default=faults_before,
                step_vs_official_malloc_default=before["binary"] / before["official"],
                ours="bestcompress binarize(spikformer_cifar(embed_dims=128, depths=2, num_heads=4, T=4), "
                     "'bestformer'), both heads' losses summed")


def bench_inference(repeats: int, batch: int = 1) -> dict:
    from bestcompress.convert import binarize
    fp = _spikformer().eval()
    binary = binarize(fp, "bestformer").model.eval()
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def infer(model):
        def run():
            with torch.no_grad():
                model(x)
        return run

    t = interleaved({"binary": infer(binary), "fp": infer(fp)}, repeats)
    return {"batch": batch, "seconds": t, f"infer_binary_vs_fp_b{batch}": t["binary"] / t["fp"]}


def _saved_bytes(model, x, mode: str, pack: bool) -> dict:
    """Bytes one training forward of `model` leaves for backward under `mode` (and its largest segment's inside)."""
    from bestcompress.nn.memory import SavedTally, packed_spikes
    from bestcompress.training.memory import memory_net
    model.train()
    net = memory_net(model, mode, say=lambda *_: None, pack=pack)
    inputs = []
    segments = [m for m in net.runner.modules() if type(m).__name__ == "Segment"] if net.runner is not None else []
    handles = [seg.register_forward_pre_hook(lambda m, a: inputs.append((m, a))) for seg in segments]
    stage_inputs = []
    stages = [m for m in net.runner.modules() if type(m).__name__ == "ReversibleStage"] if net.runner is not None else []
    handles += [st.register_forward_pre_hook(lambda m, a: stage_inputs.append((m, a))) for st in stages]
    tally = SavedTally()
    with packed_spikes(False, tally):
        out = net(x)
    for h in handles:
        h.remove()
    del out
    inside = 0
    for seg, args in inputs:  # what backward holds while it recomputes this segment (nothing packed there)
        args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                     for a in args)
        t = SavedTally()
        with packed_spikes(False, t):
            seg.fn(*args)
        inside = max(inside, t.bytes)
    for stage, (z0, z1) in stage_inputs:  # reversible: backward recomputes one sub-block F_k with a graph
        for f in stage.chain.fs:
            t = SavedTally()
            with packed_spikes(False, t):
                f(z1.detach().requires_grad_(True))
            inside = max(inside, t.bytes)
    return {"forward": tally.bytes, "largest_segment": inside, "peak": tally.bytes + inside}


def bench_memory(small: bool) -> dict:
    """Saved activations of one training step, plain autograd vs each train.memory mode (binary student)."""
    from bestcompress.convert import binarize
    from bestcompress.zoo import create_model
    depth, batch = (4, 4) if small else (8, 16)
    torch.manual_seed(0)
    fp = create_model("spikingformer", depths=depth).eval()
    student = binarize(fp, "bestformer", overrides={"reversible.form": "paper"}).model
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = {"plain": _saved_bytes(student, x, "plain", pack=False),
            "plain_packed_spikes": _saved_bytes(student, x, "plain", pack=True),
            "checkpoint": _saved_bytes(student, x, "checkpoint", pack=True),
            "reversible": _saved_bytes(student, x, "reversible", pack=True)}
    best = min(("plain_packed_spikes", "checkpoint", "reversible"), key=lambda k: rows[k]["peak"])
    ratio = rows["plain"]["peak"] / rows[best]["peak"]
    return {"model": f"spikingformer binary student, depth {depth}, embed 384, T=4, batch {batch}",
            "bytes": rows, "best": best, "memory_plain_over_best": ratio,
            "forward_only_ratio": rows["plain"]["forward"] / rows[best]["forward"],
            "step_time_vs_plain": bench_memory_time(2)}


def bench_memory_time(repeats: int) -> dict:
    """CPU time of one training step in each mode ÷ plain autograd without packing (the student_vs_fp model:
    spikformer_cifar dims 128, depth 2, T=4, batch 16; couplings ½, ½)."""
    from bestcompress.convert import binarize
    from bestcompress.training.memory import memory_net
    fp = _spikformer(embed_dims=128, depths=2, num_heads=4, T=4).eval()
    student = binarize(fp, "bestformer", overrides={"reversible.form": "paper"}).model.train()
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))

    def step(net):
        def run():
            out = net(x)
            out = out[0] + out[1] if isinstance(out, tuple) else out
            student.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(out, y).backward()
        return run
    modes = {"plain_unpacked": ("plain", False), "plain": ("plain", True), "checkpoint": ("checkpoint", True),
             "reversible": ("reversible", True)}
    t = interleaved({k: step(memory_net(student, m, say=lambda *_: None, pack=p)) for k, (m, p) in modes.items()},
                    repeats)
    return {k: v / t["plain_unpacked"] for k, v in t.items()}


def _write(result: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(RESULTS)
    print(f"wrote {RESULTS}")


def _print_memory(mem: dict) -> None:
    print(f"saved activations, {mem['model']} (MB; peak = forward + largest recomputed segment):")
    for mode, b in mem["bytes"].items():
        print(f"  {mode:<22}{b['forward'] / 1e6:>10.1f} forward {b['largest_segment'] / 1e6:>8.1f} segment "
              f"{b['peak'] / 1e6:>10.1f} peak")
    print(f"memory_plain_over_best: {mem['memory_plain_over_best']:.2f} ({mem['best']}; goal >= 4)")
    print("step time / plain autograd without packing: " + ", ".join(
        f"{k} {v:.2f}" for k, v in mem["step_time_vs_plain"].items()))


def main_memory(small: bool) -> None:
    """Re-measure only the memory row and merge it into the existing speed.json."""
    torch.set_num_threads(1)
    mem = bench_memory(small)
    _print_memory(mem)
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    result["memory_plain_over_best"] = mem["memory_plain_over_best"]
    result.setdefault("details", {})["memory"] = mem
    result["notes"] = [n for n in result.get("notes", []) if not n.startswith("memory_plain_over_best")]
    result["notes"].append("memory_plain_over_best: saved-tensor bytes (saved_tensors_hooks, each storage once), "
                           "plain autograd / the best train.memory mode's peak (forward + largest recomputed "
                           "segment); " + mem["model"])
    _write(result)


def _step_rows(args, repeats: int) -> tuple[dict, dict]:
    """(student_vs_fp, official) rows. They run last: the official row first measures with malloc as found,
    then sets what the trainer sets for CPU runs (training/alloc.py, process-wide, not undone)."""
    if args.official is None:
        off = {"skipped": "pass --official DIR with the public BESTformer code to measure it"}
    else:
        off = bench_official(args.official, args.official_shim, max(1, repeats // 2), 16 if args.quick else 64)
    if "skipped" in off:
        print(f"step_vs_official: skipped ({off['skipped']})")
    reuse_freed_memory()
    student = bench_student_vs_fp(max(1, repeats // 2), 16 if args.quick else 64)
    return student, off


def _step_keys(student: dict, off: dict) -> dict:
    return {"step_vs_official": off.get("step_vs_official"), "step_vs_official_bf16": off.get("step_vs_official_bf16"),
            "step_vs_official_both_bf16": off.get("step_vs_official_both_bf16"),
            "step_vs_official_channels_last": off.get("step_vs_official_channels_last"),
            "student_vs_fp": student["student_vs_fp"], "student_bf16_vs_fp": student["student_bf16_vs_fp"]}


NOTES = ["memory_plain_over_best: saved-tensor bytes, plain autograd / the best train.memory mode's peak",
         "ratios are ours / theirs in process CPU time, interleaved, one thread; float32 throughout except the "
         "*_bf16 keys: our student under the opt-in train.precision bf16 (binary layers on bf16 products, exact "
         "forward on spikes; nn/bf16.py), the public code and the FP model still float32; step_vs_official_both_bf16: "
         "the same bf16 student vs the public code under torch.autocast('cpu', bfloat16)",
         "binary Conv2d train on channels-last memory (passes/channels_last.py, recipe weights.channels_last, "
         "on by default); step_vs_official_channels_last: the public model moved to channels-last too "
         "(a string where its code does not run so)",
         "float32 binary convolutions on spikes run their forward as exact int8 sums (nn/int_forward.py: bit for "
         "bit the float32 output; backward float32)",
         "step rows (student_vs_fp, step_vs_official*) run with large freed blocks reused, as the trainer sets for "
         "CPU runs (training/alloc.py; process-wide, so the public code shares it); details.official."
         "step_vs_official_malloc_default is the same step measured before that setting",
         "binary students normalise [B, N, C] tokens with ChannelLastBatchNorm1d (nn/fast_norm.py, set by "
         "BinarizeWeights); the FP models and the public code keep nn.BatchNorm1d",
         "lif_gpu (only where a CUDA device is present): GPU time by CUDA events, interleaved, float32; ours is the "
         "Triton kernel when details.lif_gpu.backend says 'triton'"]


def _print_steps(result: dict, off: dict) -> None:
    for key, goal in (("student_vs_fp", "<= 1.1"), ("student_bf16_vs_fp", "(opt-in bf16)"),
                      ("step_vs_official", "<= 0.5"), ("step_vs_official_bf16", "<= 0.5 (opt-in bf16)"),
                      ("step_vs_official_both_bf16", "(both bf16)"),
                      ("step_vs_official_channels_last", "(public code channels-last too)")):
        v = result.get(key)
        shown = ("%.3f" % v) if isinstance(v, float) else (v or "n/a")
        print(f"{key:<28}{shown:>10}   {goal}")
    if "step_vs_official" in off:
        print(f"  official: {off['file']} {off['builds']}, batch {off['batch']}, seconds {off['seconds']}; "
              f"malloc as found: {off['step_vs_official_malloc_default']:.3f}; "
              f"stand-ins: {', '.join(off['stand_ins']) or 'none'}")


def main_steps(args) -> None:
    """Re-measure only the step rows (student_vs_fp, step_vs_official*) and merge them into speed.json."""
    torch.set_num_threads(1)
    student, off = _step_rows(args, args.repeats)
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    result.update(_step_keys(student, off))
    result.setdefault("details", {}).update(student=student, official=off)
    result["notes"] = NOTES
    _print_steps(result, off)
    _write(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--official", type=Path, default=None, help="folder with the public BESTformer code")
    p.add_argument("--official-shim", action="store_true",
                   help="stand in for what the public code imports and is not installed (timm helpers, "
                        "spikingjelly.clock_driven's MultiStepLIFNode; see official_bestformer.py)")
    p.add_argument("--quick", action="store_true", help="smaller student batch and fewer repeats")
    p.add_argument("--only", choices=("memory", "step", "lif_gpu"), default=None,
                   help="re-measure one row (memory, lif_gpu) or the training-step rows (step), keep the others")
    p.add_argument("--memory-small", action="store_true", help="memory row at depth 4, batch 4")
    args = p.parse_args()
    if args.only == "memory":
        return main_memory(args.memory_small)
    if args.only == "step":
        return main_steps(args)
    if args.only == "lif_gpu":
        return main_lif_gpu(args.repeats)
    torch.set_num_threads(1)
    repeats = 2 if args.quick else args.repeats
    lif = bench_lif(repeats)
    lif_gpu = bench_lif_gpu(repeats)
    infer = bench_inference(repeats)
    infer32 = bench_inference(max(1, repeats // 2), 32)
    mem = bench_memory(args.memory_small)
    student, off = _step_rows(args, repeats)
    result = {
        "lif_vs_spikingjelly": max(r["lif_vs_spikingjelly"] for r in lif),
        "lif_fused_vs_plain": max(r["lif_fused_vs_plain"] for r in lif),
        "lif_gpu": lif_gpu.get("lif_gpu"),
        **_step_keys(student, off),
        "memory_plain_over_best": mem["memory_plain_over_best"],
        "infer_binary_vs_fp_b1": infer["infer_binary_vs_fp_b1"],
        "infer_binary_vs_fp_b32": infer32["infer_binary_vs_fp_b32"],
        "details": {"lif": lif, "lif_gpu": lif_gpu, "student": student, "inference": infer, "inference_b32": infer32,
                    "memory": mem, "official": off},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": 1, "load_average_1m": os.getloadavg()[0]},
        "notes": NOTES,
    }
    print(f"{'measure':<28}{'ratio':>10}   goal")
    for key, goal in (("lif_vs_spikingjelly", "<= 0.33"), ("lif_fused_vs_plain", "(< 1)"),
                      ("infer_binary_vs_fp_b1", "<= 1.0"), ("infer_binary_vs_fp_b32", "<= 1.0"),
                      ("memory_plain_over_best", ">= 4")):
        v = result[key]
        shown = ("%.3f" % v) if isinstance(v, float) else (v or "n/a")
        print(f"{key:<28}{shown:>10}   {goal}")
    _print_steps(result, off)
    for r in lif:
        print(f"  LIF {r['shape']}: ours/spikingjelly {r['lif_vs_spikingjelly']:.3f}, fused/plain "
              f"{r['lif_fused_vs_plain']:.3f} ({r['backend']} backend: {r['why']})")
    _print_lif_gpu(lif_gpu)
    _print_memory(mem)
    _write(result)


if __name__ == "__main__":
    main()
