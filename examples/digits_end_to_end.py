"""The whole bestcompress pipeline on scikit-learn's handwritten digits, in a few minutes on a laptop CPU.

What it shows, step by step:
1. train   a small full-precision Spikformer (spikformer_cifar at the digits' own 8x8 resolution, 64 channels,
           2 blocks, T=4) from scratch on the 1,437 training digits;
2. binarize it with the `bestformer` recipe: 1-bit weights (all but the first conv and the heads), binary
           spiking attention maps, reversible two-stream couplings with a second head; then re-estimate its
           BatchNorm statistics, attention-map scales and the heads fitted to the teacher's on 8 training batches
           (calibration, as `binarize --calibrate` does it: the binary model is usable before training);
3. distill  the binary model with CIE (the recipe's distillation losses against the full-precision teacher),
           starting from the teacher's weights; a validation split of the training digits picks the best epoch;
4. export   the binary model to QONNX, standard ONNX and the packed 1-bit format, each verified against PyTorch
           (records in exports.json);
5. print    teacher vs student accuracy on the 360 held-out digits side by side (binary right after
           binarization, after calibration, after CIE), and the model summary totals (parameters, size, MACs, SOPs,
           energy), and write report.html (training curves, per-layer bits/MACs/firing rates, the summary).

    python examples/digits_end_to_end.py                 # outputs under runs/digits
    python examples/digits_end_to_end.py --out /tmp/d --teacher-epochs 2 --student-epochs 1   # a quick check

Every artifact is a normal bestcompress file: `bestcompress evaluate runs/digits/bin_cie.pt --data digits`
and `bestcompress inspect runs/digits/bin_cie.pt` work on them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from bestcompress.convert import binarize  # noqa: E402
from bestcompress.checkpoint import save_binary  # noqa: E402
from bestcompress.data import load_dataset, validation_split  # noqa: E402
from bestcompress.recipe import load_recipe  # noqa: E402
from bestcompress.training.calibration import calibrate  # noqa: E402
from bestcompress.training.trainer import distill, evaluate, train  # noqa: E402
from bestcompress.summary import summarize  # noqa: E402
from bestcompress.zoo import create_model  # noqa: E402

MODEL = dict(img_size=8, in_channels=3, num_classes=10, embed_dims=64, num_heads=4, mlp_ratios=4, depths=2, T=4)
TEACHER = {"train.lr": 5e-3, "train.warmup_epochs": 1, "train.batch_size": 32}
STUDENT = {"train.lr": 2.5e-3, "train.warmup_epochs": 0, "train.batch_size": 32,
           "train.calibrate_batches": 0}  # calibrated in step 2 already (the same mechanism distill runs by default)
CALIBRATE_BATCHES = 8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train, binarize, distill (CIE) and export a Spikformer on digits.")
    p.add_argument("--out", type=Path, default=Path("runs/digits"), help="output folder")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--student-epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default="bestformer",
                   help="the binarization recipe (e.g. bestformer_finn: coupled streams as 8-bit integers, for FINN)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: this small model's ops are too small to split, and more "
                        "threads are far slower when other processes share the cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def step(title: str) -> None:
        print(f"\n== {title}  [{time.time() - t_start:.0f}s]", flush=True)

    torch.manual_seed(args.seed)
    teacher = create_model("spikformer_cifar", **MODEL)
    data = load_dataset("digits", teacher)
    print(f"digits: {len(data.train)} training / {len(data.test)} test images, resized to {data.sample_shape}; "
          f"model spikformer_cifar {MODEL}")

    step(f"1/4 training the full-precision teacher ({args.teacher_epochs} epochs)")
    train(teacher, data, "bestformer", out / "fp.pt", epochs=args.teacher_epochs, overrides=TEACHER,
          run_dir=out / "runs" / "teacher", seed=args.seed)
    fp_scores = evaluate(teacher, data)

    step(f"2/4 binarizing with the {args.recipe} recipe")
    result = binarize(teacher, args.recipe)
    for note in result.notes:
        if not note.startswith("trace:"):
            print(f"  - {note}")
    student = result.model
    before = evaluate(student, data)
    print(f"  binary model, 0 epochs: top-1 {before['top1']:.2f}%")
    # the validation split distill will use (so calibration, like training, never sees a validation digit)
    split = validation_split(data, load_recipe(args.recipe).train.val_fraction, args.seed)
    done = calibrate(student, split, batches=CALIBRATE_BATCHES, batch_size=TEACHER["train.batch_size"],
                     seed=args.seed, teacher=teacher)  # as `binarize --calibrate`: the heads fitted too
    calibrated = evaluate(student, data)
    save_binary(student, teacher, out / "bin.pt")
    print(f"  binary model, 0 epochs, calibrated ({done.note('training digits')}): top-1 "
          f"{calibrated['top1']:.2f}%")

    step(f"3/4 distilling with CIE ({args.student_epochs} epochs, teacher = the full-precision model)")
    run = distill(student, teacher, split, out=out / "bin_cie.pt", source_model=teacher, epochs=args.student_epochs,
                  overrides=STUDENT, run_dir=out / "runs" / "student", seed=args.seed)
    after = evaluate(student, data)  # the best epoch's weights (picked on validation), as saved in bin_cie.pt
    print(f"  kept epoch {run.best_epoch} of {args.student_epochs} (validation top-1 {run.best_top1:.2f}%)")

    step("4/4 exporting the binary model")
    exported = export_all(student, out)

    summary_fp, summary_bin = summarize(teacher), summarize(student)
    print(f"\n== results  [{time.time() - t_start:.0f}s]")
    rows = [("full-precision teacher", fp_scores, summary_fp), ("binary, 0 epochs", before, summary_bin),
            ("binary, 0 epochs, calibrated", calibrated, summary_bin), ("binary BESTformer + CIE", after, summary_bin)]
    print(f"{'model':<30}{'top-1':>9}{'size':>12}{'1-bit params':>15}")
    for name, scores, s in rows:
        heads = (f"   (head {scores['top1_head']:.2f}%, head2 {scores['top1_head2']:.2f}%)"
                 if "top1_head" in scores else "")
        print(f"{name:<30}{scores['top1']:>8.2f}%{s.model_bytes / 1000:>9.1f} kB{s.binary_params:>15,}{heads}")
    print(f"accuracy change from binarization with CIE: {after['top1'] - fp_scores['top1']:+.2f} points, "
          f"{summary_fp.model_bytes / max(summary_bin.model_bytes, 1):.1f}x smaller")
    print("\ninspect totals of the binary model:")
    for line in summary_bin.totals_lines():
        print(f"  {line}")
    for line in exported:
        print(line)
    from bestcompress.report import build_report, write_report
    page = write_report(build_report([out], data="digits", batches=2), out / "report.html")
    print(f"\nfiles in {out}: fp.pt (teacher), bin.pt (binarized), bin_cie.pt (distilled), exports; "
          f"run logs in {out / 'runs'}")
    print(f"report (training curves, per-layer bits/MACs/firing rates, summary): {page}")
    print(f"total time {time.time() - t_start:.0f}s")
    return 0


def export_all(model, out: Path) -> list[str]:
    """Export to each format (verified before writing); the records go to exports.json for the report."""
    import json

    from bestcompress.errors import BestcompressError
    from bestcompress.exporters import export_model
    from bestcompress.fileio import atomic_write
    lines = ["\nexports (each verified against PyTorch before it was written):"]
    records = []
    for fmt, name in (("qonnx", "bin_cie.qonnx.onnx"), ("onnx", "bin_cie.onnx"), ("packed", "bin_cie.bcz")):
        try:
            r = export_model(model, fmt, out / name)
        except BestcompressError as e:
            lines.append(f"  {fmt:<7} not exported: {e}")
            continue
        records.append(r.to_dict())
        v = r.verification
        check = (f"max |diff| {v.max_abs_diff:.1e} on {v.samples} samples ({v.runtime})" if v is not None
                 else "not verified")
        lines.append(f"  {fmt:<7} {r.path}  {r.bytes / 1024:.1f} kB  {check}")
    atomic_write(out / "exports.json", lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1, default=str)))
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
