"""The training loop behind `bestcompress train`, `distill` and `evaluate`.

    fp = train(create_model("spikformer_cifar", ...), "digits", "bestformer", "fp.pt")
    student = binarize(fp.model, "bestformer").model
    result = distill(student, fp.model, "digits", out="bin_cie.pt", source_model=fp.model)
    print(evaluate(result.model, "digits"))

One loop serves both: AdamW (no weight decay on biases, BN and other 1-D parameters), a per-step cosine schedule
from recipe.train.lr to min_lr after a linear warm-up, label smoothing, gradient clipping, bf16 autocast on
CUDA, neuron state reset between batches (for third-party stateful neurons), an evaluation each epoch (eval
mode: a dual-head model averages its heads), metrics appended to `<run_dir>/metrics.jsonl` and `<run_dir>/last.pt`
written atomically each epoch. `resume=<run_dir>/last.pt` continues exactly: each epoch's data order and
encoding noise come from seed + epoch, so the resumed run ends with the same weights and metrics. Under torchrun
the model is wrapped in DistributedDataParallel and only rank 0 writes or prints (distributed.py).
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import DataError, ModelError
from ..recipe import Recipe, load_recipe, recipe_from_dict
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, setup_distributed, shard_indices
from .evaluation import (  # noqa: F401  (evaluate and neuron_reset_fn are part of this module's API)
    check_model_fits, evaluate, evaluate_split, has_unused_parameters, mean_logits, neuron_reset_fn, pick_device,
    resolve_data,
)
from .optim import make_optimizer, make_scheduler  # noqa: F401
from .progress import EpochProgress
from .run_state import append_metrics, load_run_checkpoint, read_metrics, save_run_checkpoint, set_rng_state, \
    truncate_metrics


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        model: the trained model (unwrapped from DDP), in eval mode.
        metrics: one dict per epoch of this run (also in metrics.jsonl), resumed epochs included.
        final: the last epoch's metrics ({} if no epoch ran).
        best_top1: the best test top-1 (%) over the epochs.
        run_dir: where last.pt and metrics.jsonl live (None when nothing is written).
        out: the final checkpoint, if one was written.
    """

    model: nn.Module
    metrics: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    best_top1: float = 0.0
    run_dir: Path | None = None
    out: Path | None = None


# ------------------------------------------------------------------------------------------------ the loop

def _fit(model: nn.Module, loss_fn: nn.Module, data, recipe: Recipe, *, kind: str, teacher: nn.Module | None,
         epochs: int | None, run_dir, resume, limit_batches, progress, device, log, seed) -> TrainResult:
    info = setup_distributed(device)
    try:
        return _fit_inner(model, loss_fn, data, recipe, kind=kind, teacher=teacher, epochs=epochs, run_dir=run_dir,
                          resume=resume, limit_batches=limit_batches, progress=progress, device=device, log=log,
                          seed=seed, info=info)
    finally:
        cleanup_distributed(info)


def _fit_inner(model, loss_fn, data, recipe, *, kind, teacher, epochs, run_dir, resume, limit_batches, progress,
               device, log, seed, info: DistInfo) -> TrainResult:
    from ..checkpoint import load_state_dict_checked
    dev = pick_device(device, info)
    main = info.is_main
    say = (log if log is not None else print) if main else (lambda *a, **k: None)
    epochs = int(epochs if epochs is not None else recipe.train.epochs)
    seed = int(seed if seed is not None else recipe.train.seed)
    if epochs < 1:
        raise DataError(f"epochs must be at least 1, got {epochs}.")
    amp = dev.type == "cuda"

    model.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()  # it runs under no_grad; its parameters are left as they are
    check_model_fits(model, data, dev)
    if teacher is not None:
        check_model_fits(teacher, data, dev)

    run_dir = Path(run_dir) if run_dir is not None else (Path(resume).parent if resume else None)
    metrics_path = run_dir / "metrics.jsonl" if run_dir else None
    if main and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)

    n_train = len(data.train)
    per_rank_batch = max(1, -(-recipe.train.batch_size // info.world_size))
    per_rank_n = -(-n_train // info.world_size)
    steps = -(-per_rank_n // per_rank_batch)
    if limit_batches is not None:
        steps = min(steps, int(limit_batches))

    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, steps, epochs)
    start_epoch, best, history = 0, 0.0, []
    if resume is not None:
        state = load_run_checkpoint(resume, kind)
        load_state_dict_checked(model, state["model"], f"Run checkpoint '{resume}'", "the model being trained")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_epoch, best = int(state["epoch"]), float(state["best_top1"])
        if main and metrics_path is not None:
            truncate_metrics(metrics_path, start_epoch)
            history = read_metrics(metrics_path)
        say(f"resumed from {resume} after epoch {start_epoch}/{epochs}")
    elif main and metrics_path is not None and metrics_path.exists():
        metrics_path.unlink()  # a fresh run in a used folder starts a fresh log

    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=has_unused_parameters(model, data, dev))
    reset = neuron_reset_fn(model)
    taps_ctx = nullcontext(None)
    if getattr(loss_fn, "needs_features", False):
        from .taps import feature_taps
        taps_ctx = feature_taps(model, teacher)
    x_all, y_all = data.train.tensors
    enable_bar = progress if progress is not None else (main and sys.stderr.isatty())

    with taps_ctx as taps:
        for epoch in range(start_epoch, epochs):
            torch.manual_seed(seed * 100_003 + epoch)  # any in-model randomness (dropout) is per-epoch seeded
            perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            idx = shard_indices(perm, info)
            enc_gen = torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009 + info.rank + 7)
            net.train()
            sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
            part_sums: dict[str, float] = {}
            t0 = time.perf_counter()
            with EpochProgress(enable_bar, f"epoch {epoch + 1}/{epochs}", steps) as bar:
                for step in range(steps):
                    sel = idx[step * per_rank_batch:(step + 1) * per_rank_batch]
                    if len(sel) == 0:
                        break
                    x = data.encode(x_all[sel], enc_gen).to(dev, non_blocking=True)
                    y = y_all[sel].to(dev)
                    if taps is not None:
                        taps.clear()
                    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
                    with autocast:
                        t_logits = None
                        if teacher is not None and (loss_fn.needs_teacher or loss_fn.needs_features):
                            with torch.no_grad():
                                t_logits = teacher(x)
                        out = net(x)
                        loss, parts = loss_fn(out, y, teacher_logits=t_logits,
                                              student_features=taps.student if taps is not None else None,
                                              teacher_features=taps.teacher if taps is not None else None)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if recipe.train.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    if reset:
                        reset()
                    if teacher is not None:
                        t_reset = neuron_reset_fn(teacher)
                        if t_reset:
                            t_reset()
                    n = float(len(sel))
                    sums["loss"] += float(loss.detach()) * n
                    sums["correct"] += float((mean_logits(out).argmax(-1) == y).sum())
                    sums["count"] += n
                    for k, v in parts.items():
                        if k != "total":
                            part_sums[k] = part_sums.get(k, 0.0) + v * n
                    elapsed = time.perf_counter() - t0
                    bar.update(loss=sums["loss"] / sums["count"], acc=100 * sums["correct"] / sums["count"],
                               lr=optimizer.param_groups[0]["lr"], rate=sums["count"] * info.world_size / elapsed)
            train_time = time.perf_counter() - t0
            keys = sorted(part_sums)
            reduced = all_reduce_sum([sums["loss"], sums["correct"], sums["count"]] + [part_sums[k] for k in keys],
                                     info, dev)
            count = max(reduced[2], 1.0)
            test = evaluate_split(model, data, dev, info, limit_batches, amp=amp)
            best = max(best, test["top1"])
            record = {"epoch": epoch + 1, "train_loss": reduced[0] / count, "train_top1": 100.0 * reduced[1] / count,
                      **{f"train_{k}": reduced[3 + i] / count for i, k in enumerate(keys)},
                      "lr": optimizer.param_groups[0]["lr"],
                      **{f"test_{k}": v for k, v in test.items() if k != "n"}, "best_top1": best,
                      "samples_per_s": reduced[2] / max(train_time, 1e-9), "epoch_time_s": train_time}
            history.append(record)
            if main and run_dir is not None:
                save_run_checkpoint(run_dir / "last.pt", kind=kind, epoch=epoch + 1, epochs=epochs,
                                    model_state=model.state_dict(), optimizer=optimizer, scheduler=scheduler,
                                    best_top1=best, recipe=recipe.to_dict(), seed=seed,
                                    world_size=info.world_size)
                append_metrics(metrics_path, record)
            heads = (f" (head {test['top1_head']:.2f}%, head2 {test['top1_head2']:.2f}%)"
                     if "top1_head" in test else "")
            say(f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.4f}  train {record['train_top1']:.2f}%  "
                f"test {test['top1']:.2f}%{heads}  lr {record['lr']:.2e}  {record['samples_per_s']:.0f} samples/s")
            barrier(info)
    model.eval()
    return TrainResult(model=model, metrics=history, final=history[-1] if history else {}, best_top1=best,
                       run_dir=run_dir)


# ------------------------------------------------------------------------------------------------ public API

def _run_extra(result: TrainResult, kind: str) -> dict:
    final = result.final
    return {"trained_by": kind, "epochs": int(final.get("epoch", 0)), "top1": float(final.get("test_top1", 0.0)),
            "best_top1": float(result.best_top1)}


def train(model: nn.Module, data, recipe: str | Recipe | None = "bestformer", out=None, *, epochs: int | None = None,
          overrides: dict | None = None, run_dir=None, resume=None, encoding: str = "direct",
          subset: int | None = None, limit_batches: int | None = None, seed: int | None = None,
          progress: bool | None = None, device=None, log: Callable | None = None,
          source_model: nn.Module | None = None) -> TrainResult:
    """Train a model with label-smoothed cross-entropy (the full-precision teacher, or a binary model without
    distillation; a dual-head model learns the labels with both heads).

    Args:
        model: the model (trained in place).
        data: a DataBundle or a data set name/path ('digits', 'mnist1d', 'synthetic', folder, .npz).
        recipe: recipe name/path/Recipe; its `train` section and `distill.label_smoothing` are used.
        out: final checkpoint (save_fp; save_binary with `source_model` for a binarized model). None: no file.
        epochs: overrides recipe.train.epochs.
        overrides: dotted recipe overrides ({'train.lr': 1e-3}).
        run_dir: folder for last.pt and metrics.jsonl (default: the resume file's folder; None writes neither).
        resume: a last.pt to continue from (exactly).
        encoding, subset: see load_dataset.
        limit_batches: at most this many training (and evaluation) batches per epoch, for quick runs.
        seed: overrides recipe.train.seed (data order and encoding noise).
        progress: show a progress bar (default: when stderr is a terminal).
        device: 'cpu', 'cuda', ... (default: CUDA when available).
        log: called with one line per epoch (default print; rank 0 only).
        source_model: for a binarized model, the full-precision model it was made from (recorded in `out`).
    Returns:
        TrainResult.
    """
    from .losses import class_loss
    recipe = load_recipe(recipe, overrides)
    data = resolve_data(data, model, encoding, subset, recipe.train.seed if seed is None else seed)
    result = _fit(model, class_loss(recipe.distill), data, recipe, kind="train", teacher=None, epochs=epochs,
                  run_dir=run_dir, resume=resume, limit_batches=limit_batches, progress=progress, device=device,
                  log=log, seed=seed)
    if out is not None and _is_main():
        from ..checkpoint import save_binary, save_fp
        model = result.model.cpu()
        if getattr(model, "bc_recipe", None) is not None:
            if source_model is None:
                raise ModelError("Saving a trained binary model needs the full-precision model it was made from "
                                 "(source_model).")
            result.out = save_binary(model, source_model, out, extra=_run_extra(result, "train"))
        else:
            result.out = save_fp(model, out, extra=_run_extra(result, "train"))
    return result


def distill(student: nn.Module, teacher: nn.Module | None, data, recipe: str | Recipe | None = None, out=None, *,
            source_model: nn.Module | None = None, epochs: int | None = None, overrides: dict | None = None,
            run_dir=None, resume=None, encoding: str = "direct", subset: int | None = None,
            limit_batches: int | None = None, seed: int | None = None, progress: bool | None = None, device=None,
            log: Callable | None = None) -> TrainResult:
    """Coupled Information Enhancement: train a binary student with the CIE losses against a teacher.

    Args:
        student: the binary model (from binarize or load_binary), trained in place.
        teacher: the teacher (by default the full-precision model the student was made from); may be None when
            the recipe's losses need no teacher.
        data: a DataBundle or a data set name/path.
        recipe: recipe name/path/Recipe; default: the recipe the student was binarized with (student.bc_recipe).
        out: final binary checkpoint (save_binary). None: no file.
        source_model: the full-precision model the student was made from, recorded in `out` (default: the teacher
            when it is the same architecture).
        Other arguments as for `train`.
    Returns:
        TrainResult.
    """
    from .losses import CIELoss
    if recipe is None:
        stored = getattr(student, "bc_recipe", None)
        recipe = recipe_from_dict(stored, source="the student's recipe") if stored else "bestformer"
    recipe = load_recipe(recipe, overrides)
    loss_fn = CIELoss(recipe.distill)
    if teacher is None and (loss_fn.needs_teacher or loss_fn.needs_features):
        raise ModelError(f"The distillation losses {', '.join(recipe.distill.losses)} need a teacher; give one "
                         "(--teacher) or use a binary checkpoint that records its full-precision source.")
    data = resolve_data(data, student, encoding, subset, recipe.train.seed if seed is None else seed)
    if out is not None and source_model is None:
        t_arch = (getattr(teacher, "bc_spec", None) or {}).get("arch")
        s_arch = (getattr(student, "bc_spec", None) or {}).get("arch")
        if teacher is None or s_arch is None or t_arch != s_arch:
            raise ModelError("Saving the distilled model needs the full-precision model it was made from "
                             "(source_model); the teacher is a different architecture.")
        source_model = teacher
    result = _fit(student, loss_fn, data, recipe, kind="distill", teacher=teacher, epochs=epochs, run_dir=run_dir,
                  resume=resume, limit_batches=limit_batches, progress=progress, device=device, log=log, seed=seed)
    if out is not None and _is_main():
        from ..checkpoint import save_binary
        result.out = save_binary(result.model.cpu(), source_model.cpu(), out, extra=_run_extra(result, "distill"))
    return result


def _is_main() -> bool:
    import os
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True
