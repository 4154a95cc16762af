"""Ablation of Coupled Information Enhancement (CIE): which parts recover the accuracy binarization costs.

Tasks (generated offline with the `mnist1d` package, standardized with the training mean and std, written to .npz
under --work): `mnist1d` (the package's default generator: 4,000 training / 1,000 test sequences of length 40) and
`mnist1d_hard` (the same generator with more noise and shear, see HARD). Model: `spikformer_seq` (MODEL).

Per task, a full-precision teacher is trained from scratch (`fp`: its test top-1). Every binary student is binarized from the teacher's weights (1-bit weights, binary attention
maps) and fine-tuned with `bestcompress.training.trainer.distill` under the same schedule (STUDENT), differing only
in the method keys of VARIANTS. Each run holds out `train.val_fraction` of its training set as the validation split
(never the test set), or with --student-val-size validates on that many other training sequences (never the test
set, never a student's training sequence); the epoch with the best validation top-1 is kept and its *test* top-1
is reported.
`calibrated_0ep` is the default recipe's binary model after calibration on 8 training batches as `binarize
--calibrate` does it (BatchNorm statistics, attention-map scales, then the heads fitted to the teacher's heads;
training/calibration.py), before any training (0 epochs); `without_head_fit_top1` records it without the head fit. The teacher is trained
on every training sequence and keeps its last epoch (cosine schedule to min_lr).

Prints mean ± std over the seeds and writes benchmarks/results/ablation_cie.json as
{"<task>": {"<epochs>": {"<variant>": {"top1": [...], "mean": m, "std": s}}}} (plus a "_meta" entry) and
ablation_cie.md. Runs go to a pool of worker processes (one torch thread each).

    python benchmarks/ablation_cie.py --plan wave2d --default-is cie --student-train-size 2000 \\
        --student-val-size 1000 --reuse-teachers
    python benchmarks/ablation_cie.py --plan wave2b --student-train-size 2000 --reuse-teachers
    python benchmarks/ablation_cie.py --plan reduced --student-train-size 2000 --budget-min 84 --reuse-teachers
    python benchmarks/ablation_cie.py --plan full --tasks mnist1d,mnist1d_hard --seeds 3 --epochs 12,30
    python benchmarks/ablation_cie.py --plan full --tasks mnist1d --seeds 1 --epochs 1 --variants plain,default \\
        --teacher-epochs 1 --train-size 500                          # a smoke run
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
HARD = dict(corr_noise_scale=0.5, iid_noise_scale=0.05, shear_scale=1.0, scale_coeff=0.5)  # defaults .25/.02/.75/.4
TEACHER = {"train.lr": 3e-3, "train.min_lr": 1e-5, "train.warmup_epochs": 1, "train.batch_size": 64,
           "train.weight_decay": 0.06, "train.grad_clip": 1.0, "distill.label_smoothing": 0.1,
           "train.val_fraction": 0.0}  # the teacher keeps its last epoch (cosine to min_lr), trained on every sequence
STUDENT = {"train.lr": 2e-3, "train.min_lr": 1e-5, "train.warmup_epochs": 0, "train.batch_size": 64,
           "train.weight_decay": 0.0, "train.grad_clip": 1.0, "distill.label_smoothing": 0.1,
           "train.val_fraction": 0.1}
_NO_COUPLINGS = {"reversible.enabled": False}
_CAL = {"train.calibrate_batches": 8, "train.fit_heads": False}
_NO_CAL = {"train.calibrate_batches": 0}
# variant: (description, recipe overrides on top of bestformer; None = the bestformer recipe as shipped)
VARIANTS = {
    "plain": ("binary, plain fine-tuning (no calibration, no couplings, cross-entropy)",
              {**_NO_COUPLINGS, **_NO_CAL, "distill.losses": []}),
    "calibrated": ("+ calibration (BatchNorm statistics, then the attention maps' scales λ)",
                   {**_NO_COUPLINGS, **_CAL, "distill.losses": []}),
    "paper_cie": ("the paper's CIE: paper-form couplings + hard KD, no calibration (recipe bestformer_paper)",
                  {**_NO_CAL, "reversible.enabled": True, "reversible.form": "paper", "distill.losses": ["hard"],
                   "distill.alpha": 0.5, "distill.temperature": 1.0}),
    "couplings_paper": ("+ calibration + paper-form couplings (½, ½), cross-entropy on both heads",
                        {**_CAL, "reversible.enabled": True, "reversible.form": "paper", "distill.losses": []}),
    "couplings_preserving": ("+ calibration + preserving couplings (learnable a, b from 0, 1), cross-entropy",
                             {**_CAL, "reversible.enabled": True, "reversible.form": "preserving",
                              "distill.losses": []}),
    "hard": ("+ calibration + hard KD (α 0.5), no couplings",
             {**_NO_COUPLINGS, **_CAL, "distill.losses": ["hard"], "distill.alpha": 0.5}),
    "soft": ("+ calibration + soft KD (τ 2, α 0.5), no couplings",
             {**_NO_COUPLINGS, **_CAL, "distill.losses": ["soft"], "distill.alpha": 0.5,
              "distill.temperature": 2.0}),
    "feature": ("+ calibration + feature alignment of block outputs (w 1), no couplings",
                {**_NO_COUPLINGS, **_CAL, "distill.losses": ["feature"], "distill.feature_weight": 1.0}),
    "attention": ("+ calibration + attention-relation distillation (w 1), no couplings",
                  {**_NO_COUPLINGS, **_CAL, "distill.losses": ["attention"], "distill.attention_weight": 1.0}),
    "couplings_soft": ("+ calibration + preserving couplings + soft KD (τ 2, α 0.5) on head2",
                       {**_CAL, "reversible.enabled": True, "reversible.form": "preserving",
                        "distill.losses": ["soft"], "distill.alpha": 0.5, "distill.temperature": 2.0}),
    "calibrated_soft": ("+ calibration + soft KD (τ 2, α 0.5), no couplings",
                        {**_NO_COUPLINGS, **_CAL, "distill.losses": ["soft"], "distill.alpha": 0.5,
                         "distill.temperature": 2.0}),
    "calibrated_couplings": ("+ calibration + preserving couplings, cross-entropy on both heads",
                             {**_CAL, "reversible.enabled": True, "reversible.form": "preserving",
                              "distill.losses": []}),
    "cie": ("+ calibration + preserving couplings + soft KD (τ 2, α 0.5) on both heads (distill.heads both)",
            {**_CAL, "reversible.enabled": True, "reversible.form": "preserving", "distill.losses": ["soft"],
             "distill.alpha": 0.5, "distill.temperature": 2.0, "distill.heads": "both"}),
    "cie_fit": ("cie + the heads fitted to the FP heads by least squares at calibration (train.fit_heads)",
                {**_CAL, "reversible.enabled": True, "reversible.form": "preserving", "distill.losses": ["soft"],
                 "distill.alpha": 0.5, "distill.temperature": 2.0, "distill.heads": "both", "train.fit_heads": True}),
    "default": ("the default `bestformer` recipe as shipped", None),
    "default_bf16": ("the default `bestformer` recipe + train.precision bf16 (binary layers on bf16 products with "
                     "fp32 accumulation, bf16-rounded gradients; nn/bf16.py)", {"train.precision": "bf16"}),
    "default_stream8": ("the default `bestformer` recipe + reversible.stream_bits 8 (= recipe bestformer_finn: coupled "
                        "streams as 8-bit integers times a calibrated power of two, straight-through gradient; "
                        "nn/stream_quant.py)", {"reversible.stream_bits": 8}),
}
# the first default candidate (bestformer.yaml while the first part of the reduced plan ran), kept for the record
DEFAULT_V1 = ("first default candidate: calibration + preserving couplings + soft KD (τ 2) + feature alignment",
              {**_CAL, "reversible.enabled": True, "reversible.form": "preserving",
               "distill.losses": ["soft", "feature"], "distill.alpha": 0.5, "distill.temperature": 2.0,
               "distill.feature_weight": 1.0})
ALWAYS = ("fp", "plain", "calibrated_0ep", "default")
# the plan of the second wave-2 session (teachers keep their last epoch; calibration includes the attention scales):
# plain vs cie (= the shipped default) on both tasks, 3 seeds, 12 and 30 epochs; one calibration-only run
WAVE2B = [
    ("mnist1d", 12, ["cie", "plain"], 3),
    ("mnist1d_hard", 12, ["plain", "cie"], 3),
    ("mnist1d", 30, ["plain", "cie"], 3),
    ("mnist1d_hard", 30, ["plain", "cie"], 3),
    ("mnist1d", 12, ["calibrated", "calibrated_soft", "calibrated_couplings"], 1),
]
# the plan of the third wave-2 session, a fresh run on another CPU (teachers retrained: CPU training is not bitwise
# reproducible across machines, so the WAVE2B runs, kept in ablation_cie_wave2b.json, had other teachers; WAVE2C is kept in ablation_cie_wave2c.json): plain vs
# the default on every cell with 3 seeds, calibration alone with 3 seeds at 12 epochs, then one seed of each component
WAVE2C = [
    ("mnist1d", 12, ["plain", "cie"], 3),
    ("mnist1d_hard", 12, ["plain", "cie"], 3),
    ("mnist1d", 30, ["plain", "cie"], 3),
    ("mnist1d_hard", 30, ["plain", "cie"], 3),
    ("mnist1d", 12, ["calibrated"], 3),
    ("mnist1d_hard", 12, ["calibrated"], 3),
    ("mnist1d", 12, ["calibrated_soft", "calibrated_couplings", "couplings_paper", "hard", "feature", "attention",
                     "paper_cie"], 1),
    ("mnist1d_hard", 12, ["calibrated_soft", "calibrated_couplings", "couplings_paper", "hard", "feature",
                          "attention", "paper_cie"], 1),
]
# the plan of the fourth wave-2 session, a fresh run on another CPU again (Intel Xeon with AMX; teachers retrained),
# decided before it ran: the students validate on --student-val-size held-out *training* sequences (the 1,000 that
# follow the students' 2,000; the WAVE2C split of 200 sequences carved from the students' own set gave picks with a
# standard error of ~3.5 points), so they train on all 2,000. The 30-epoch cells first (the longest runs), then the
# 12-epoch cells, then the candidates for the default at 12 epochs.
WAVE2D = [
    ("mnist1d", 30, ["plain", "cie"], 3),
    ("mnist1d_hard", 30, ["plain", "cie"], 3),
    ("mnist1d", 12, ["plain", "cie"], 3),
    ("mnist1d_hard", 12, ["plain", "cie"], 3),
    ("mnist1d", 12, ["calibrated_couplings", "couplings_paper", "cie_fit"], 3),
    ("mnist1d_hard", 12, ["calibrated_couplings", "couplings_paper", "cie_fit"], 3),
]
# the head fit (train.fit_heads) against the same default without it, run as --name ablation_cie_fit beside WAVE2C (kept as ablation_cie_wave2c_fit.json)
FIT = [
    ("mnist1d", 12, ["cie_fit"], 3),
    ("mnist1d_hard", 12, ["cie_fit"], 3),
    ("mnist1d", 30, ["cie_fit"], 3),
    ("mnist1d_hard", 30, ["cie_fit"], 3),
]
# the reduced plan of the first session: (task, epochs, variants, seeds), in order of priority
REDUCED = [
    ("mnist1d", 12, ["plain", "default"], 3),
    ("mnist1d", 12, ["calibrated", "couplings_preserving", "soft", "feature", "attention", "paper_cie"], 1),
    ("mnist1d_hard", 12, ["plain", "default"], 3),
    ("mnist1d", 30, ["plain", "default"], 1),
    ("mnist1d_hard", 30, ["plain", "default"], 1),
    ("mnist1d", 12, ["couplings_paper", "hard"], 1),
]
# run after (part of) REDUCED, with --merge: the best single component (soft KD) and it with couplings, every cell
FOLLOWUP = [
    ("mnist1d", 12, ["soft", "couplings_soft"], 3),
    ("mnist1d_hard", 12, ["plain", "couplings_soft"], 3),
    ("mnist1d", 30, ["plain", "couplings_soft"], 1),
    ("mnist1d_hard", 30, ["plain", "couplings_soft"], 1),
    ("mnist1d_hard", 12, ["soft"], 3),
    ("mnist1d", 12, ["couplings_paper", "hard"], 1),
]


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)


def _quiet(_line: str) -> None:
    pass


def make_task(task: str, work: Path, train_size: int | None, val_size: int | None = None) -> str:
    """Write the task's .npz (train possibly cut to `train_size`, the full test set) and return its path.

    With `val_size`, the file's training set is instead the `val_size` training sequences that follow the first
    `train_size` (a validation set taken from the training set, disjoint from the students' training sequences and
    from the test set).
    """
    import numpy as np
    path = work / (f"{task}_{train_size or 'all'}.npz" if not val_size else f"{task}_val{val_size}_after{train_size}.npz")
    if path.exists():
        return str(path)
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    if task == "mnist1d_hard":
        for k, v in HARD.items():
            setattr(args, k, v)
    elif task != "mnist1d":
        raise SystemExit(f"unknown task {task!r} (mnist1d, mnist1d_hard)")
    d = make_dataset(args)  # never get_dataset(): that one downloads
    x, xt = d["x"].astype(np.float32), d["x_test"].astype(np.float32)
    mean, std = float(x.mean()), float(x.std())
    x, xt = (x - mean) / std, (xt - mean) / std
    y, yt = np.asarray(d["y"], np.int64), np.asarray(d["y_test"], np.int64)
    if val_size:
        if not train_size or train_size + val_size > len(x):
            raise SystemExit(f"--student-val-size {val_size} needs --student-train-size with both fitting in the "
                             f"{len(x)} training sequences")
        x, y = x[train_size:train_size + val_size], y[train_size:train_size + val_size]
    elif train_size:
        x, y = x[:train_size], y[:train_size]
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x[:, None], y=y, x_test=xt[:, None], y_test=yt)
    os.replace(tmp, path)
    return str(path)


def run_teacher(task: str, seed: int, data_path: str, epochs: int, work: str, reuse: bool = False) -> dict:
    """Train the task's teacher (or, with `reuse`, take the one an earlier run of the same setting saved)."""
    record = Path(work) / f"teacher_{task}_seed{seed}.json"
    setting = {"model": MODEL, "epochs": epochs, "overrides": TEACHER, "data": data_path}
    if reuse and record.exists():
        cached = json.loads(record.read_text())
        if cached.get("setting") == setting and Path(cached["result"]["path"]).exists():
            return {**cached["result"], "reused": True}
    import torch
    from bestcompress.checkpoint import save_fp
    from bestcompress.training.trainer import train
    from bestcompress.zoo import create_model
    torch.manual_seed(seed)
    model = create_model("spikformer_seq", **MODEL)
    t0 = time.time()
    result = train(model, data_path, "bestformer", epochs=epochs, overrides=TEACHER, seed=seed, log=_quiet,
                   progress=False)
    path = Path(work) / f"teacher_{task}_seed{seed}.pt"
    save_fp(result.model, path)
    best = result.best
    out = {"task": task, "seed": seed, "variant": "fp", "epochs": epochs, "top1": best["test_top1"],
           "best_epoch": result.best_epoch, "val_top1": best.get("val_top1"), "time_s": time.time() - t0,
           "path": str(path), "params": sum(p.numel() for p in model.parameters()),
           "curve_test": [m.get("test_top1") for m in result.metrics]}
    record.write_text(json.dumps({"setting": setting, "result": out}))
    return out


def _student_overrides(variant: str) -> dict:
    method = VARIANTS[variant][1]
    return {**STUDENT, **(method or {})}


def run_calibrated_0ep(task: str, seed: int, data_path: str, teacher_path: str) -> dict:
    import torch
    from bestcompress.convert import binarize
    from bestcompress.loading import load
    from bestcompress.training.calibration import calibrate
    from bestcompress.training.evaluation import evaluate
    teacher = load(teacher_path).model
    torch.manual_seed(seed)
    student = binarize(teacher, "bestformer").model
    before = evaluate(student, data_path)["top1"]
    calibrate(student, data_path, batches=8, batch_size=64, seed=seed)
    after = evaluate(student, data_path)
    fit = calibrate(student, data_path, batches=8, batch_size=64, seed=seed, teacher=teacher)  # + the head fit
    fitted = evaluate(student, data_path)["top1"] if fit.heads else None
    return {"task": task, "seed": seed, "variant": "calibrated_0ep", "epochs": 0,  # top1: as binarize --calibrate
            "top1": fitted if fitted is not None else after["top1"],
            "uncalibrated_top1": before, "without_head_fit_top1": after["top1"], "with_head_fit_top1": fitted,
            **{k: v for k, v in after.items() if k.startswith("top1_")}}


def _with_validation(data_path: str, val_path: str | None, model):
    """The students' data: the .npz path, or with `val_path` a DataBundle whose validation set is that file's
    training sequences (so train.val_fraction carves nothing)."""
    if not val_path:
        return data_path
    import dataclasses
    from bestcompress.data import load_dataset
    bundle = load_dataset(data_path, model)
    return dataclasses.replace(bundle, val=load_dataset(val_path, model).train)


def run_student(task: str, seed: int, variant: str, epochs: int, data_path: str, teacher_path: str,
                work: str, val_path: str | None = None) -> dict:
    import torch
    from bestcompress.convert import binarize
    from bestcompress.loading import load
    from bestcompress.training.trainer import distill
    teacher = load(teacher_path).model.eval()
    over = _student_overrides(variant)
    structural = {k: v for k, v in over.items() if k.startswith(("reversible.", "weights.", "attention."))}
    torch.manual_seed(seed)
    student = binarize(teacher, "bestformer", overrides=structural).model
    data = _with_validation(data_path, val_path, student)
    t0 = time.time()
    result = distill(student, teacher, data, "bestformer", epochs=epochs, overrides=over, seed=seed, log=_quiet,
                     progress=False, run_dir=Path(work) / f"{task}_{variant}_{epochs}ep_seed{seed}")
    best = result.best
    out = {"task": task, "seed": seed, "variant": variant, "epochs": epochs, "top1": best["test_top1"],
           "best_epoch": result.best_epoch, "val_top1": best.get("val_top1"), "time_s": time.time() - t0,
           "last_top1": result.final.get("test_top1"),
           "curve_test": [m.get("test_top1") for m in result.metrics],
           "curve_val": [m.get("val_top1") for m in result.metrics],
           "val_sequences": None if isinstance(data, str) else len(data.val)}
    for k in ("test_top1_head", "test_top1_head2"):
        if k in best:
            out[k] = best[k]
    couplings = [(n, float(p.detach())) for n, p in result.model.named_parameters() if n.startswith("reversible.")]
    if couplings:
        out["coupling_coefficients"] = couplings
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_plan(args) -> list[tuple[str, int, str, int]]:
    """[(task, epochs, variant, seed)] of student runs, in order of priority."""
    if args.plan in ("reduced", "followup", "wave2b", "wave2c", "wave2d", "fit"):
        jobs = []
        plans = {"reduced": REDUCED, "followup": FOLLOWUP, "wave2b": WAVE2B, "wave2c": WAVE2C, "wave2d": WAVE2D,
                 "fit": FIT}
        for task, epochs, variants, seeds in plans[args.plan]:
            jobs += [(task, epochs, v, s) for s in range(seeds) for v in variants]
        return jobs
    variants = [v for v in args.variants.split(",") if v not in ("fp", "calibrated_0ep")]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    return [(t, e, v, s) for e in args.epochs for t in args.tasks for s in range(args.seeds) for v in variants]


def summarize_runs(runs: list[dict], plan_epochs: dict[str, set[int]]) -> dict:
    table: dict = {}
    by = {}
    for r in runs:
        by.setdefault((r["task"], r["variant"], r["epochs"]), []).append(r)
    for task, epochs_set in plan_epochs.items():
        table[task] = {}
        fp = [r for r in runs if r["task"] == task and r["variant"] == "fp"]
        cal = [r for r in runs if r["task"] == task and r["variant"] == "calibrated_0ep"]
        for epochs in sorted(epochs_set):
            cell = {}
            for key, rs in (("fp", fp), ("calibrated_0ep", cal)):
                vals = [r["top1"] for r in sorted(rs, key=lambda r: r["seed"])]
                if vals:
                    cell[key] = {"top1": vals, "mean": _mean_std(vals)[0], "std": _mean_std(vals)[1]}
            order = list(VARIANTS) + ["default_v1"]
            for (t, v, e), rs in sorted(by.items(), key=lambda kv: order.index(kv[0][1])
                                        if kv[0][1] in order else -1):
                if t != task or e != epochs or v not in order:
                    continue
                rs = sorted(rs, key=lambda r: r["seed"])
                vals = [r["top1"] for r in rs]
                m, s = _mean_std(vals)
                cell[v] = {"top1": vals, "mean": m, "std": s, "seeds": [r["seed"] for r in rs],
                           "best_epoch": [r["best_epoch"] for r in rs]}
                if any("test_top1_head2" in r for r in rs):
                    cell[v]["top1_head"] = [r.get("test_top1_head") for r in rs]
                    cell[v]["top1_head2"] = [r.get("test_top1_head2") for r in rs]
            for key in ALWAYS:
                cell.setdefault(key, {"top1": [], "mean": None, "std": None, "note": "not run"})
            table[task][str(epochs)] = cell
    return table


def _relabel(runs: list[dict], default_is: str | None) -> list[dict]:
    if not default_is:
        return runs
    out = []
    for r in runs:
        if r["variant"] == "default":
            out.append({**r, "variant": "default_v1"})
        else:
            out.append(r)
            if r["variant"] == default_is:
                out.append({**r, "variant": "default"})
    return out


def _markdown(table: dict, meta: dict) -> str:
    lines = [f"CIE ablation: `spikformer_seq` (D={MODEL['embed_dims']}, depth {MODEL['depths']}, "
             f"{MODEL['num_heads']} heads, T={MODEL['T']}, {meta['params'] / 1e3:.0f} k parameters). Test top-1 (%) "
             "at the epoch picked on the validation split; mean ± std over the seeds run (n).", ""]
    for task, by_epochs in table.items():
        for epochs, cell in by_epochs.items():
            lines += [f"**{task}, {epochs} epochs**", "", "| variant | top-1 mean ± std (n) | per seed | what |",
                      "|---|---|---|---|"]
            for key, v in cell.items():
                if not v["top1"]:
                    lines.append(f"| {key} | not run | | |")
                    continue
                what = {"fp": "full-precision teacher",
                        "calibrated_0ep": "the default recipe's binary model as `binarize --calibrate` makes it "
                        "(BatchNorm statistics, attention-map scales, heads fitted to the teacher's), 0 epochs",
                        "default_v1": DEFAULT_V1[0]}.get(key) or VARIANTS[key][0]
                if key == "default" and meta.get("default_is"):
                    what = f"the shipped `bestformer` recipe (= {meta['default_is'].split(chr(39))[1]})"
                per = ", ".join(f"{x:.1f}" for x in v["top1"])
                lines.append(f"| {key} | {v['mean']:.2f} ± {v['std']:.2f} ({len(v['top1'])}) | {per} | {what} |")
            lines.append("")
    lines += [meta["note"], "", f"Command: `{meta['command']}`. Wall time {meta['wall_time_s'] / 60:.1f} min, "
              f"{meta['workers']} workers ({meta['machine']}).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--merge", action="store_true",
                   help="keep the runs of an existing results JSON and skip the runs it already holds")
    p.add_argument("--summarize-only", action="store_true", help="rewrite the JSON/markdown from its runs")
    p.add_argument("--default-is", default=None, metavar="VARIANT",
                   help="the shipped bestformer recipe equals this variant's configuration: list its runs as "
                        "`default` and earlier `default` runs as `default_v1` (DEFAULT_V1)")
    p.add_argument("--plan", choices=("fit", "wave2d", "wave2c", "wave2b", "reduced", "followup", "full"), default="wave2b",
                   help="reduced: the REDUCED list (fits ~50 min on 2 cores); full: tasks × epochs × variants × seeds")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["mnist1d", "mnist1d_hard"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=lambda s: [int(e) for e in s.split(",")], default=[12, 30])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--teacher-epochs", type=int, default=12)
    p.add_argument("--teacher-seeds", type=int, default=1,
                   help="teachers per task (seed s of a student uses teacher s mod this)")
    p.add_argument("--train-size", type=int, default=None,
                   help="cut every task's training set to this many samples (the test set stays whole)")
    p.add_argument("--student-train-size", type=int, default=None,
                   help="cut the students' training set only (the teacher trains on --train-size)")
    p.add_argument("--student-val-size", type=int, default=None,
                   help="validate the students on this many training sequences that follow --student-train-size "
                        "(held out of every student's training set; the test set is never used) instead of carving "
                        "train.val_fraction out of their training set")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (one thread each)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no run that would end (by the seconds per epoch measured so far) after this many "
                        "minutes")
    p.add_argument("--reuse-teachers", action="store_true",
                   help="take teachers saved in --work by an earlier run of the same setting")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation_cie")
    p.add_argument("--name", default="ablation_cie")
    args = p.parse_args(argv)

    jobs = build_plan(args)
    tasks = sorted({t for t, *_ in jobs}, key=["mnist1d", "mnist1d_hard"].index)
    plan_epochs: dict[str, set[int]] = {}
    for t, e, _, _ in jobs:
        plan_epochs.setdefault(t, set()).add(e)
    seeds_needed = {t: max(s for tt, _, _, s in jobs if tt == t) + 1 for t in tasks}
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    previous: list[dict] = []
    previous_meta: dict = {}
    existing = args.out / f"{args.name}.json"
    if (args.merge or args.summarize_only) and existing.exists():
        old_doc = json.loads(existing.read_text())
        previous, previous_meta = old_doc.get("_runs", []), old_doc.get("_meta", {})
        have = {(r["task"], r["epochs"], r["variant"], r["seed"]) for r in previous}
        jobs = [j for j in jobs if j not in have]
        for r in previous:
            if r["variant"] not in ("fp", "calibrated_0ep"):
                plan_epochs.setdefault(r["task"], set()).add(r["epochs"])
    if args.summarize_only:
        jobs = []
    data = {t: make_task(t, args.work, args.train_size) for t in tasks}
    student_data = {t: make_task(t, args.work, args.student_train_size or args.train_size) for t in tasks}
    student_val = {t: (make_task(t, args.work, args.student_train_size, args.student_val_size)
                       if args.student_val_size else None) for t in tasks}
    t_start = time.time()
    runs: list[dict] = [r for r in previous if args.summarize_only or r["variant"] not in ("fp", "calibrated_0ep")]
    skipped: list[str] = list(previous_meta.get("skipped", []))
    merged = {id(r) for r in runs}  # rates for --budget-min come from this invocation's runs only
    teachers: dict[tuple[str, int], str] = {}
    waiting = list(jobs)
    meta = {"command": "python benchmarks/ablation_cie.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": {"arch": "spikformer_seq", **MODEL}, "hard_generator": HARD, "teacher_overrides": TEACHER,
            "student_overrides": STUDENT, "variants": {k: {"what": d, "overrides": o} for k, (d, o) in VARIANTS.items()},
            "teacher_epochs": args.teacher_epochs, "teacher_seeds": args.teacher_seeds,
            "train_size": args.train_size, "student_train_size": args.student_train_size,
            "student_val_size": args.student_val_size, "plan": args.plan,
            "reduced_plan": REDUCED, "workers": args.workers,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, 1 torch thread per worker"}

    def write(final=False):
        params = next((r["params"] for r in runs if "params" in r), 0)
        meta.update(wall_time_s=time.time() - t_start, params=params, skipped=skipped, complete=final,
                    note=("Reduced: one FP teacher per task (seed 0), shared by the student seeds (a student seed "
                          "changes its validation split and data order); see _meta.plan and the REDUCED list in the "
                          "script for which cells ran with how many seeds." if args.teacher_seeds == 1 else
                          "One teacher per seed."))
        table = summarize_runs(_relabel(runs, args.default_is), plan_epochs)
        if args.default_is:
            meta["default_is"] = (f"the shipped bestformer recipe has variant '{args.default_is}''s configuration; "
                                  f"`default` lists those runs; `default_v1` is {DEFAULT_V1[0]} "
                                  f"({DEFAULT_V1[1]})")
        if previous_meta:
            meta["earlier_invocations"] = previous_meta.get("earlier_invocations", []) + [previous_meta.get("command")]
            if "first_session" in previous_meta:  # the first session's runs (another teacher), kept for the record
                meta["first_session"] = previous_meta["first_session"]
        doc = {**table, "_meta": meta, "_runs": runs}
        tmp = args.out / f".{args.name}.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, args.out / f"{args.name}.json")
        md = _markdown(table, meta)
        tmp = args.out / f".{args.name}.md.tmp"
        tmp.write_text(md)
        os.replace(tmp, args.out / f"{args.name}.md")
        return md

    if args.summarize_only:
        print(write(final=True))
        return 0
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_init_worker) as pool:
        pending = set()
        for t in tasks:
            for s in range(min(args.teacher_seeds, seeds_needed[t])):
                pending.add(pool.submit(run_teacher, t, s, data[t], args.teacher_epochs, str(args.work),
                                        args.reuse_teachers))

        def _estimate(epochs: int, variant: str) -> float:
            """Seconds a run is expected to take: epochs × the slowest seconds per epoch seen so far."""
            rates = [r["time_s"] / r["epochs"] for r in runs if r.get("epochs") and r["variant"] not in
                     ("fp", "calibrated_0ep") and r.get("time_s") and id(r) not in merged]
            return epochs * max(rates) if rates else 0.0

        def submit_ready():
            for job in list(waiting):
                task, epochs, variant, seed = job
                tp = teachers.get((task, seed % args.teacher_seeds))
                if tp is None or len(pending) >= args.workers:
                    continue
                if args.budget_min is not None and time.time() - t_start + _estimate(epochs, variant) > \
                        60 * args.budget_min:
                    skipped.append(f"{task} {epochs}ep {variant} seed {seed}")
                    waiting.remove(job)
                    continue
                waiting.remove(job)
                pending.add(pool.submit(run_student, task, seed, variant, epochs, student_data[task], tp,
                                        str(args.work), student_val[task]))

        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                r = fut.result()
                runs.append(r)
                print(f"[{time.time() - t_start:6.0f}s] {r['task']:<12} {r['variant']:<20} {r['epochs']:>2}ep seed "
                      f"{r['seed']}  top-1 {r['top1']:.2f}%" + (f" (best epoch {r['best_epoch']})"
                                                               if "best_epoch" in r else ""), flush=True)
                if r["variant"] == "fp":
                    teachers[(r["task"], r["seed"])] = r["path"]
                    for s in range(seeds_needed[r["task"]]):
                        if s % args.teacher_seeds == r["seed"]:
                            pending.add(pool.submit(run_calibrated_0ep, r["task"], s, student_data[r["task"]],
                                                    r["path"]))
                write()
            submit_ready()
            while len(pending) < args.workers and waiting and any(
                    teachers.get((t, s % args.teacher_seeds)) for t, _, _, s in waiting):
                before = len(waiting)
                submit_ready()
                if len(waiting) == before:
                    break
    md = write(final=True)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
