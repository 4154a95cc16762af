"""Everything a run needs before its first epoch: device, checks, validation split, calibration, optimizer,
schedule, resumed state, DDP wrapper, teacher cache, and the line that says what is being trained.

`prepare_run` returns a `Run`; epoch.py trains one epoch of it, record.py scores and records it.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..data import validation_split
from ..recipe import Recipe
from .alloc import reuse_freed_memory
from .distributed import DistInfo
from .memory import memory_net
from .evaluation import check_model_fits, has_unused_parameters, neuron_reset_fn, pick_device
from .optim import make_optimizer, make_scheduler
from .outputs import two_headed
from .run_state import read_metrics, set_rng_state, truncate_metrics


@dataclass
class Run:
    """The state of one training run (see prepare_run)."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    loss_fn: nn.Module
    data: object
    recipe: Recipe
    kind: str
    teacher: nn.Module | None
    options: dict
    info: DistInfo
    device: torch.device
    amp: bool
    say: Callable
    epochs: int
    seed: int
    steps: int
    per_rank_batch: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    run_dir: Path | None
    limit_batches: int | None
    show_bar: bool
    two_heads: bool
    two_heads_teacher: bool = False
    reset: Callable | None = None
    teacher_reset: Callable | None = None
    teacher_cache: object = None
    start_epoch: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_top1": None, "model": None})

    @property
    def metrics_path(self) -> Path | None:
        return self.run_dir / "metrics.jsonl" if self.run_dir is not None else None

    @property
    def last_path(self) -> Path | None:
        return self.run_dir / "last.pt" if self.run_dir is not None else None

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None and bool(self.loss_fn.needs_teacher or self.loss_fn.needs_features)


def _describe(model: nn.Module) -> str:
    spec = getattr(model, "bc_spec", None) or {}
    name = spec.get("arch") or spec.get("factory") or type(model).__name__
    params = sum(p.numel() for p in model.parameters())
    binary = " (binary)" if getattr(model, "bc_recipe", None) is not None else ""
    return f"{name}{binary}, {params:,} parameters"


def _calibrate(run: Run, state_loaded: bool) -> None:
    """Calibration (BatchNorm statistics, attention-map scales, with train.fit_heads the heads) at the start of
    distill (recipe train.calibrate_batches; not on resume)."""
    n = run.recipe.train.calibrate_batches
    if run.kind != "distill" or n <= 0 or state_loaded:
        return
    from .calibration import calibrate
    done = calibrate(run.model, run.data, batches=n, batch_size=run.per_rank_batch, seed=run.seed,
                     device=run.device, teacher=run.teacher if run.recipe.train.fit_heads else None)
    if done.batchnorms or done.attention_scales:
        run.say(f"recalibrated {done.note()}")


def prepare_run(model: nn.Module, loss_fn: nn.Module, data, recipe: Recipe, *, kind: str,
                teacher: nn.Module | None, options: dict, run_dir, resume_state: dict | None, resume_path,
                limit_batches, progress, device, log, info: DistInfo) -> Run:
    from ..checkpoint import load_state_dict_checked
    dev = pick_device(device, info)
    if dev.type == "cpu":
        reuse_freed_memory()  # large activations from the heap, not fresh zero-filled pages (training/alloc.py)
    say = (log if log is not None else print) if info.is_main else (lambda *a, **k: None)
    epochs, seed = int(options["epochs"]), int(options["seed"])
    data = validation_split(data, recipe.train.val_fraction, seed)

    model.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()  # it runs under no_grad; its parameters are left as they are
    for who, net in (("student", model), ("teacher", teacher)):
        note = check_model_fits(net, data, dev) if net is not None else None
        if note:
            say(f"note ({who}): {note}.")

    run_dir = Path(run_dir) if run_dir is not None else (Path(resume_path).parent if resume_path else None)
    if info.is_main and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)

    per_rank_batch = max(1, -(-recipe.train.batch_size // info.world_size))
    per_rank_n = -(-len(data.train) // info.world_size)  # ceil: shards are padded to equal length
    steps = -(-per_rank_n // per_rank_batch)
    if limit_batches is not None:
        steps = min(steps, int(limit_batches))
    optimizer = make_optimizer(model, recipe)
    run = Run(model=model, net=model, loss_fn=loss_fn, data=data, recipe=recipe, kind=kind, teacher=teacher,
              options=options, info=info, device=dev, amp=dev.type == "cuda", say=say, epochs=epochs, seed=seed,
              steps=steps, per_rank_batch=per_rank_batch, optimizer=optimizer,
              scheduler=make_scheduler(optimizer, recipe, steps, epochs), run_dir=run_dir,
              limit_batches=limit_batches,
              show_bar=progress if progress is not None else (info.is_main and sys.stderr.isatty()),
              two_heads=two_headed(model), reset=neuron_reset_fn(model),
              teacher_reset=neuron_reset_fn(teacher) if teacher is not None else None,
              two_heads_teacher=teacher is not None and two_headed(teacher))

    if resume_state is not None:
        load_state_dict_checked(model, resume_state["model"], f"Run checkpoint '{resume_path}'",
                                "the model being trained")
        optimizer.load_state_dict(resume_state["optimizer"])
        run.scheduler.load_state_dict(resume_state["scheduler"])
        set_rng_state(resume_state["rng"])
        run.start_epoch = int(resume_state["epoch"])
        run.best = dict(resume_state["best"])
        if info.is_main and run.metrics_path is not None:
            truncate_metrics(run.metrics_path, run.start_epoch)
            run.history = read_metrics(run.metrics_path)
        say(f"resumed from {resume_path} after epoch {run.start_epoch}/{epochs}")
    elif info.is_main and run.metrics_path is not None and run.metrics_path.exists():
        run.metrics_path.unlink()  # a fresh run in a used folder starts a fresh log

    _calibrate(run, resume_state is not None)  # before DDP: every rank sees the same batches, same statistics
    run.net = memory_net(model, recipe.train.memory, say)  # train.memory: plain | checkpoint | reversible
    if info.enabled:
        run.net = nn.parallel.DistributedDataParallel(
            run.net, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=has_unused_parameters(model, data, dev))
    if run.uses_teacher and not loss_fn.needs_features and data.deterministic:
        from .teacher_cache import TeacherCache
        run.teacher_cache = TeacherCache(teacher, data, dev, run.amp, run.teacher_reset)
    say(_intro(run))
    return run


def _intro(run: Run) -> str:
    d = run.data
    val = f" / {len(d.val):,} validation" if d.val is not None else ""
    teacher = ""
    if run.uses_teacher:
        cached = ", its logits cached" if run.teacher_cache is not None else ""
        teacher = f", teacher {(run.options.get('teacher') or {}).get('name') or _describe(run.teacher)}{cached}"
    start = f", from epoch {run.start_epoch + 1}" if run.start_epoch else ""
    return (f"{run.kind}: {_describe(run.model)} on '{d.name}' ({len(d.train):,} training{val} / {len(d.test):,} "
            f"test samples, {d.encoding.name} encoding) for {run.epochs} epoch{'s' if run.epochs != 1 else ''} of "
            f"{run.steps} steps "
            f"(batch {run.recipe.train.batch_size}){start}{teacher}, on {run.device}")


def taps_context(run: Run):
    """Feature taps on student and teacher when a loss needs them, else a context that yields None."""
    if getattr(run.loss_fn, "needs_features", False):
        from .taps import feature_taps
        return feature_taps(run.model, run.teacher, **getattr(run.loss_fn, "tap_options", {}))
    return nullcontext(None)
