"""The training loop behind `bestcompress train` and `distill` (and, re-exported, `evaluate`).

    fp = train(create_model("spikformer_cifar", ...), "digits", "bestformer", "fp.pt")
    student = binarize(fp.model, "bestformer").model
    result = distill(student, fp.model, "digits", out="bin_cie.pt", source_model=fp.model)
    print(evaluate(result.model, "digits"))

One loop serves both: AdamW (no weight decay on biases, BN and other 1-D parameters), a per-step cosine schedule
from recipe.train.lr to min_lr after a linear warm-up, label smoothing, gradient clipping, bf16 autocast on
CUDA, neuron state reset between batches (for third-party stateful neurons). A validation set carved from the
training set (recipe train.val_fraction, stratified, seeded; never the test set) picks the best epoch: the model
returned and saved is the best epoch's, the last epoch stays in `<run_dir>/last.pt`. distill first re-estimates
the binary model's BatchNorm statistics on a few training batches (train.calibrate_batches) and computes the
teacher's logits once per sample when the data is deterministic. The first non-finite loss or gradient stops the
run with one sentence. `resume=<run_dir>/last.pt` continues exactly, with the options the run was started with.
The pieces: setup.py (before the first epoch), epoch.py (one epoch), record.py (scoring and files),
run_state.py (last.pt, metrics.jsonl, options), distributed.py (torchrun).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import DataError, ModelError
from ..recipe import Recipe, load_recipe, recipe_from_dict
from .distributed import cleanup_distributed, is_main_process, setup_distributed
from .epoch import train_epoch
from .evaluation import evaluate, resolve_data  # noqa: F401  (evaluate is part of this module's API)
from .optim import make_optimizer, make_scheduler  # noqa: F401
from .record import end_epoch, keep_best
from .run_state import load_run_checkpoint, model_fingerprint, resume_options
from .setup import prepare_run, taps_context


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        model: the trained model (unwrapped from DDP) holding the best epoch's weights, in eval mode.
        metrics: one dict per epoch (also in metrics.jsonl), resumed epochs included.
        final: the last epoch's metrics ({} if no epoch ran).
        best_epoch: the epoch whose weights `model` holds (picked on validation top-1; the last without one).
        best_top1: the validation top-1 (%) of that epoch (None without a validation set).
        run_dir: where last.pt and metrics.jsonl live (None when nothing is written).
        out: the final checkpoint, if one was written.
    """

    model: nn.Module
    metrics: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    best_epoch: int = 0
    best_top1: float | None = None
    run_dir: Path | None = None
    out: Path | None = None

    @property
    def best(self) -> dict:
        """The metrics of the best epoch ({} if no epoch ran)."""
        return next((r for r in self.metrics if r.get("epoch") == self.best_epoch), self.final)


# ------------------------------------------------------------------------------------------------ the loop

def _fit(model: nn.Module, loss_fn: nn.Module, data, recipe: Recipe, *, kind: str, teacher: nn.Module | None,
         options: dict, run_dir, resume, resume_state, limit_batches, progress, device, log) -> TrainResult:
    info = setup_distributed(device)
    try:
        run = prepare_run(model, loss_fn, data, recipe, kind=kind, teacher=teacher, options=options,
                          run_dir=run_dir, resume_state=resume_state, resume_path=resume, limit_batches=limit_batches,
                          progress=progress, device=device, log=log, info=info)
        with taps_context(run) as taps:
            for epoch in range(run.start_epoch, run.epochs):
                end_epoch(run, epoch, train_epoch(run, epoch, taps))
        keep_best(run)
    finally:
        cleanup_distributed(info)
    model.eval()
    return TrainResult(model=model, metrics=run.history, final=run.history[-1] if run.history else {},
                       best_epoch=int(run.best["epoch"]), best_top1=run.best["val_top1"], run_dir=run.run_dir)


def _data_name(data) -> str | None:
    from ..data import DataBundle
    if data is None:
        return None
    return data.name if isinstance(data, DataBundle) else str(data)


def teacher_info(teacher: nn.Module | None, name: str | None = None, file=None) -> dict | None:
    """How last.pt records the teacher: a name for messages, its file (if any) and a fingerprint of its weights."""
    if teacher is None:
        return None
    spec = getattr(teacher, "bc_spec", None) or {}
    return {"name": name or spec.get("arch") or type(teacher).__name__, "file": str(file) if file else None,
            "sha1": model_fingerprint(teacher)}


def _plan(kind: str, resume, recipe, overrides, default_recipe, *, data, epochs, seed, encoding, subset,
          limit_batches, teacher: dict | None):
    """(resume state or None, Recipe, options): a fresh run's options, or the resumed run's (conflicts refused)."""
    from ..data import DataBundle
    if isinstance(data, DataBundle) and encoding is None:
        encoding = data.encoding.name
    given = {"epochs": epochs, "seed": seed, "data": _data_name(data), "encoding": encoding, "subset": subset,
             "limit_batches": limit_batches, "teacher": teacher}
    if resume is not None:
        state = load_run_checkpoint(resume, kind)
        stored = state.get("options")
        if isinstance(stored, dict) and (recipe is not None or overrides):
            base = recipe if recipe is not None else recipe_from_dict(stored["recipe"], source=f"'{resume}'")
            given["recipe"] = load_recipe(base, overrides).to_dict()
        options = resume_options(stored, given, resume)
        return state, recipe_from_dict(options["recipe"], source=f"'{resume}'"), options
    if data is None:
        raise DataError("Give the data to train on (a data set name, a folder or a .npz file).")
    resolved = load_recipe(recipe if recipe is not None else default_recipe, overrides)
    options = {"recipe": resolved.to_dict(), "epochs": int(epochs if epochs is not None else resolved.train.epochs),
               "seed": int(seed if seed is not None else resolved.train.seed), "data": _data_name(data),
               "encoding": encoding or "direct", "subset": subset, "limit_batches": limit_batches,
               "teacher": teacher}
    if options["epochs"] < 1:
        raise DataError(f"epochs must be at least 1, got {options['epochs']}.")
    return None, resolved, options


# ------------------------------------------------------------------------------------------------ public API

def _run_extra(result: TrainResult, kind: str) -> dict:
    best = result.best
    return {"trained_by": kind, "epochs": int(result.final.get("epoch", 0)), "best_epoch": result.best_epoch,
            "val_top1": result.best_top1, "top1": float(best.get("test_top1", 0.0))}


def train(model: nn.Module, data=None, recipe: str | Recipe | None = None, out=None, *, epochs: int | None = None,
          overrides: dict | None = None, run_dir=None, resume=None, encoding: str | None = None,
          subset: int | None = None, limit_batches: int | None = None, seed: int | None = None,
          progress: bool | None = None, device=None, log: Callable | None = None,
          source_model: nn.Module | None = None) -> TrainResult:
    """Train a model with label-smoothed cross-entropy (the full-precision teacher, or a binary model without
    distillation; a dual-head model learns the labels with both heads).

    Args:
        model: the model (trained in place; it ends with the best epoch's weights).
        data: a DataBundle or a data set name/path ('digits', 'mnist1d', 'synthetic', folder, .npz); with
            `resume`, default the run's.
        recipe: recipe name/path/Recipe (default 'bestformer'; with `resume`, the run's); its `train` section and
            `distill.label_smoothing` are used.
        out: final checkpoint (save_fp; save_binary with `source_model` for a binarized model). None: no file.
        epochs: overrides recipe.train.epochs.
        overrides: dotted recipe overrides ({'train.lr': 1e-3}).
        run_dir: folder for last.pt and metrics.jsonl (default: the resume file's folder; None writes neither).
        resume: a last.pt to continue from (exactly); options given again must equal the run's.
        encoding, subset: see load_dataset (default 'direct', all samples).
        limit_batches: at most this many training (and evaluation) batches per epoch, for quick runs.
        seed: overrides recipe.train.seed (data order, encoding noise, validation split).
        progress: show a progress bar (default: when stderr is a terminal).
        device: 'cpu', 'cuda', ... (default: CUDA when available).
        log: called with each line (default print; rank 0 only).
        source_model: for a binarized model, the full-precision model it was made from (recorded in `out`).
    Returns:
        TrainResult.
    Raises:
        ModelError: a non-finite loss or gradient (the sentence names epoch and step).
        CheckpointError: `resume` is not a run of `train`, or options given again differ from the run's.
    """
    from .losses import class_loss
    state, recipe, options = _plan("train", resume, recipe, overrides, "bestformer", data=data, epochs=epochs,
                                   seed=seed, encoding=encoding, subset=subset, limit_batches=limit_batches,
                                   teacher=None)
    data = resolve_data(data if data is not None else options["data"], model, options["encoding"],
                        options["subset"], options["seed"])
    result = _fit(model, class_loss(recipe.distill), data, recipe, kind="train", teacher=None, options=options,
                  run_dir=run_dir, resume=resume, resume_state=state, limit_batches=options["limit_batches"],
                  progress=progress, device=device, log=log)
    if out is not None and is_main_process():
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


def distill(student: nn.Module, teacher: nn.Module | None, data=None, recipe: str | Recipe | None = None, out=None,
            *, source_model: nn.Module | None = None, epochs: int | None = None, overrides: dict | None = None,
            run_dir=None, resume=None, encoding: str | None = None, subset: int | None = None,
            limit_batches: int | None = None, seed: int | None = None, progress: bool | None = None, device=None,
            log: Callable | None = None, teacher_name: str | None = None, teacher_file=None) -> TrainResult:
    """Coupled Information Enhancement: train a binary student with the CIE losses against a teacher.

    The student's BatchNorm statistics are first re-estimated on recipe.train.calibrate_batches training batches
    (not when resuming).

    Args:
        student: the binary model (from binarize or bc.load), trained in place.
        teacher: the teacher (by default the full-precision model the student was made from); may be None when
            the recipe's losses need no teacher.
        data: a DataBundle or a data set name/path (with `resume`, default the run's).
        recipe: recipe name/path/Recipe; default: the recipe the student was binarized with (student.bc_recipe).
        out: final binary checkpoint (save_binary) of the best epoch. None: no file.
        source_model: the full-precision model the student was made from, recorded in `out` (default: the teacher
            when it is the same architecture).
        teacher_name, teacher_file: how last.pt and the first line name the teacher, and its file (a resumed
            `bestcompress distill` loads it again).
        Other arguments as for `train`.
    Returns:
        TrainResult.
    """
    from .losses import CIELoss
    stored = getattr(student, "bc_recipe", None)
    default = recipe_from_dict(stored, source="the student's recipe") if stored else "bestformer"
    state, recipe, options = _plan("distill", resume, recipe, overrides, default, data=data, epochs=epochs,
                                   seed=seed, encoding=encoding, subset=subset, limit_batches=limit_batches,
                                   teacher=teacher_info(teacher, teacher_name, teacher_file))
    loss_fn = CIELoss(recipe.distill)
    if teacher is None and (loss_fn.needs_teacher or loss_fn.needs_features):
        raise ModelError(f"The distillation losses {', '.join(recipe.distill.losses)} need a teacher; give one "
                         "(--teacher) or use a binary checkpoint that records its full-precision source.")
    data = resolve_data(data if data is not None else options["data"], student, options["encoding"],
                        options["subset"], options["seed"])
    if out is not None and source_model is None:
        t_arch = (getattr(teacher, "bc_spec", None) or {}).get("arch")
        s_arch = (getattr(student, "bc_spec", None) or {}).get("arch")
        if teacher is None or s_arch is None or t_arch != s_arch:
            raise ModelError("Saving the distilled model needs the full-precision model it was made from "
                             "(source_model); the teacher is a different architecture.")
        source_model = teacher
    result = _fit(student, loss_fn, data, recipe, kind="distill", teacher=teacher, options=options,
                  run_dir=run_dir, resume=resume, resume_state=state, limit_batches=options["limit_batches"],
                  progress=progress, device=device, log=log)
    if out is not None and is_main_process():
        from ..checkpoint import save_binary
        result.out = save_binary(result.model.cpu(), source_model.cpu(), out, extra=_run_extra(result, "distill"))
    return result
