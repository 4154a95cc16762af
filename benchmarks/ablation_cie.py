"""Ablation of Coupled Information Enhancement (CIE) on MNIST-1D with `spikformer_seq`.

For each seed, a full-precision teacher is trained from scratch; then four binary students are made from the
teacher's weights with the bestformer recipe (1-bit weights, binary attention maps) and fine-tuned for the same
budget (same epochs, optimizer, schedule and data order):

    binary, no CIE        couplings off (reversible.enabled=false), plain label-smoothed cross-entropy
    + reversible only     couplings on (two streams, head + head2), cross-entropy on both heads, no teacher
    + distillation only   couplings off, hard distillation from the teacher: (1-a)·CE(head, y) + a·CE(head, argmax t)
    + both (CIE)          couplings on, hard distillation: (1-a)·CE(head, y) + a·CE(head2, argmax t)

Top-1 is the last epoch's accuracy on the 1,000 MNIST-1D test sequences (no checkpoint selection on the test
set). Prints mean ± std over the seeds, writes benchmarks/results/ablation_cie.json and ablation_cie.md.
Independent runs go to a pool of worker processes (one intra-op thread each: faster than threads here).

    python benchmarks/ablation_cie.py                    # the reported configuration, 3 seeds
    python benchmarks/ablation_cie.py --seeds 1 --teacher-epochs 2 --student-epochs 1   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(seq_len=40, in_channels=1, num_classes=10, embed_dims=64, num_heads=4, mlp_ratios=4, depths=2, T=2)
TEACHER = {"train.lr": 3e-3, "train.min_lr": 1e-5, "train.warmup_epochs": 1, "train.batch_size": 64,
           "train.weight_decay": 0.06, "train.grad_clip": 1.0, "distill.label_smoothing": 0.1}
STUDENT = {"train.lr": 2e-3, "train.min_lr": 1e-5, "train.warmup_epochs": 0, "train.batch_size": 64,
           "train.weight_decay": 0.0, "train.grad_clip": 1.0, "distill.label_smoothing": 0.1,
           "distill.losses": ["hard"], "distill.alpha": 0.5}
VARIANTS = {
    "no_cie": ("binary, no CIE", False, False),
    "reversible": ("+ reversible only", True, False),
    "distill": ("+ distillation only", False, True),
    "cie": ("+ both (CIE)", True, True),
}


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)


def _quiet(_line: str) -> None:
    pass


def run_teacher(seed: int, model_cfg: dict, epochs: int, over: dict, work: str, reuse: bool = False) -> dict:
    """Train the seed's teacher (or, with `reuse`, take the one a previous run of the same setting saved)."""
    import torch
    setting = {"model": model_cfg, "epochs": epochs, "overrides": over}
    record = Path(work) / f"teacher_seed{seed}.json"
    if reuse and record.exists():
        cached = json.loads(record.read_text())
        if cached.get("setting") == setting and Path(cached["path"]).exists():
            return cached["result"]
    from bestcompress.checkpoint import save_fp
    from bestcompress.data import load_dataset
    from bestcompress.training.trainer import train
    from bestcompress.zoo import create_model
    torch.manual_seed(seed)
    model = create_model("spikformer_seq", **model_cfg)
    data = load_dataset("mnist1d", model)
    t0 = time.time()
    result = train(model, data, "bestformer", epochs=epochs, overrides=over, seed=seed, log=_quiet, progress=False,
                   run_dir=Path(work) / f"seed{seed}_teacher")
    path = Path(work) / f"teacher_seed{seed}.pt"
    save_fp(result.model, path)
    out = {"seed": seed, "variant": "teacher", "top1": result.final["test_top1"], "time_s": time.time() - t0,
           "curve": [m["test_top1"] for m in result.metrics], "path": str(path),
           "params": sum(p.numel() for p in model.parameters())}
    record.write_text(json.dumps({"setting": setting, "path": str(path), "result": out}))
    return out


def run_student(seed: int, variant: str, teacher_path: str, epochs: int, over: dict, work: str) -> dict:
    import torch
    from bestcompress.convert import binarize
    from bestcompress.loading import load_model
    from bestcompress.data import load_dataset
    from bestcompress.training.trainer import distill, evaluate, train
    _, couplings, distillation = VARIANTS[variant]
    teacher = load_model(teacher_path)
    torch.manual_seed(seed)
    student = binarize(teacher, "bestformer", overrides={"reversible.enabled": couplings}).model
    data = load_dataset("mnist1d", teacher)
    before = evaluate(student, data)["top1"]
    run = dict(epochs=epochs, overrides=dict(over), seed=seed, log=_quiet, progress=False,
               run_dir=Path(work) / f"seed{seed}_{variant}")
    t0 = time.time()
    if distillation:
        result = distill(student, teacher, data, "bestformer", **run)
    else:
        result = train(student, data, "bestformer", **run)
    return {"seed": seed, "variant": variant, "top1": result.final["test_top1"], "before_top1": before,
            "time_s": time.time() - t0, "curve": [m["test_top1"] for m in result.metrics]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=12)
    p.add_argument("--student-epochs", type=int, default=6)
    p.add_argument("--workers", type=int, default=2, help="parallel processes (one thread each)")
    p.add_argument("--model", default="", help="model overrides, e.g. T=2,embed_dims=32")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation_cie", help="teacher checkpoints")
    p.add_argument("--name", default="ablation_cie")
    p.add_argument("--set", dest="student_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a student recipe key, e.g. --set distill.losses=[soft] (repeatable)")
    p.add_argument("--reuse-teachers", action="store_true",
                   help="take teachers saved in --work by an earlier run of the same setting")
    args = p.parse_args(argv)

    model_cfg = dict(MODEL)
    for item in filter(None, args.model.split(",")):
        k, v = item.split("=")
        model_cfg[k] = type(MODEL[k])(float(v)) if isinstance(MODEL[k], (int, float)) else v
    variants = [v for v in args.variants.split(",") if v]
    from bestcompress.recipe import parse_overrides
    student_over = {**STUDENT, **parse_overrides(args.student_set)}
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    results: list[dict] = []
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_init_worker) as pool:
        pending = {pool.submit(run_teacher, s, model_cfg, args.teacher_epochs, TEACHER, str(args.work),
                               args.reuse_teachers)
                   for s in range(args.seeds)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                r = fut.result()
                results.append(r)
                extra = f" (before fine-tuning {r['before_top1']:.2f}%)" if "before_top1" in r else ""
                print(f"[{time.time() - t_start:6.0f}s] seed {r['seed']} {r['variant']:<11} top-1 {r['top1']:.2f}%"
                      f"{extra} in {r['time_s']:.0f}s", flush=True)
                if r["variant"] == "teacher":
                    for v in variants:
                        pending.add(pool.submit(run_student, r["seed"], v, r["path"], args.student_epochs, student_over,
                                                 str(args.work)))
    wall = time.time() - t_start

    rows = [("teacher", "FP teacher")] + [(v, VARIANTS[v][0]) for v in variants]
    table = []
    for key, label in rows:
        vals = [r["top1"] for r in sorted(results, key=lambda r: r["seed"]) if r["variant"] == key]
        mean, std = _mean_std(vals)
        before = [r["before_top1"] for r in results if r["variant"] == key and "before_top1" in r]
        table.append({"variant": key, "label": label, "mean": mean, "std": std, "per_seed": vals,
                      "before_finetune_mean": statistics.fmean(before) if before else None})
    params = next(r["params"] for r in results if r["variant"] == "teacher")
    summary = {
        "benchmark": "CIE ablation, MNIST-1D (4,000 train / 1,000 test, mnist1d default arguments)",
        "model": {"arch": "spikformer_seq", **model_cfg, "params": params},
        "teacher_epochs": args.teacher_epochs, "student_epochs": args.student_epochs, "seeds": args.seeds,
        "teacher_recipe_overrides": TEACHER, "student_recipe_overrides": student_over,
        "recipe": "bestformer (1-bit weights except first conv and heads, binary attention maps)",
        "rows": table, "runs": results, "wall_time_s": wall, "workers": args.workers,
        "reused_teachers": args.reuse_teachers,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads per worker 1",
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    md = _markdown(summary)
    (args.out / f"{args.name}.md").write_text(md)
    print()
    print(md)
    return 0


def _markdown(s: dict) -> str:
    m = s["model"]
    lines = [
        f"CIE ablation on MNIST-1D: `spikformer_seq` (D={m['embed_dims']}, depth {m['depths']}, {m['num_heads']} heads, "
        f"T={m['T']}, {m['params'] / 1e3:.0f} k parameters), {s['seeds']} seeds, top-1 (%) on the 1,000 test sequences "
        "after the last epoch.",
        "",
        "| model | top-1 (mean ± std) | per seed |",
        "|---|---|---|",
    ]
    for r in s["rows"]:
        per = ", ".join(f"{v:.1f}" for v in r["per_seed"])
        lines.append(f"| {r['label']} | {r['mean']:.2f} ± {r['std']:.2f} | {per} |")
    so = s["student_recipe_overrides"]
    losses = list(so.get("distill.losses", ["hard"]))
    described = {"hard": "hard distillation CE(head2, argmax teacher)",
                 "soft": f"soft distillation τ²·KL at τ = {so.get('distill.temperature', 1.0)}",
                 "feature": f"feature alignment of the block outputs (weight {so.get('distill.feature_weight', 1.0)})"}
    kd = " + ".join(described[k] for k in losses)
    alpha = so.get("distill.alpha", 0.5)
    lines += [
        "",
        f"Teacher: {s['teacher_epochs']} epochs from scratch, AdamW lr {s['teacher_recipe_overrides']['train.lr']}, "
        "cosine, label smoothing 0.1. Every binary student starts from its seed's teacher weights binarized with "
        f"the `bestformer` recipe and is fine-tuned for {s['student_epochs']} epochs (AdamW lr {so['train.lr']}, "
        "cosine, same data order). No CIE: couplings off, label-smoothed cross-entropy. Reversible only: couplings "
        "on, cross-entropy on both heads, no teacher. Distillation only: couplings off (one head plays both roles). "
        f"Both (CIE): couplings on. Distillation loss: (1 − α)·CE(head, y) + α·[{kd}] with α = {alpha}.",
        f"Wall time {s['wall_time_s'] / 60:.1f} min with {s['workers']} worker processes ({s['machine']})"
        + ("; teachers reused from an earlier run of the same setting." if s.get("reused_teachers") else "."),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
