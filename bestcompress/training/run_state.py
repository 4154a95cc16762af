"""A training run on disk: the per-epoch checkpoint `<run_dir>/last.pt`, RNG states and `metrics.jsonl`.

`last.pt` is written atomically after every epoch and loads with `torch.load(weights_only=True)`: model state,
optimizer, scheduler, RNG states (torch, CUDA, numpy, python), the epoch just finished, the best accuracy and
the recipe. The data order does not depend on it (each epoch's permutation comes from seed + epoch), so a run
resumed from epoch e repeats exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_save, atomic_write, load_checkpoint_file
from ..errors import CheckpointError

RUN_FORMAT = "bestcompress-run"
RUN_VERSION = 1


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run_checkpoint(path: Path, *, kind: str, epoch: int, epochs: int, model_state: dict, optimizer,
                        scheduler, best_top1: float, recipe: dict, seed: int, world_size: int) -> Path:
    payload = {"format": RUN_FORMAT, "version": RUN_VERSION, "kind": kind, "epoch": epoch, "epochs": epochs,
               "model": {k: v.detach().cpu() for k, v in model_state.items()},
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
               "best_top1": best_top1, "recipe": recipe, "seed": seed, "world_size": world_size}
    return atomic_save(payload, path)


def load_run_checkpoint(path: str | os.PathLike, kind: str) -> dict:
    """A `last.pt` written by the trainer, checked to be one (and of the same kind of run)."""
    path = Path(path)
    obj = load_checkpoint_file(path)
    if not (isinstance(obj, dict) and obj.get("format") == RUN_FORMAT):
        raise CheckpointError(f"'{path}' is not a training-run checkpoint (resume from the last.pt in a run folder).")
    if obj.get("version") != RUN_VERSION:
        raise CheckpointError(f"'{path}' has run-checkpoint version {obj.get('version')!r}; this bestcompress "
                              f"reads version {RUN_VERSION}.")
    if obj.get("kind") != kind:
        raise CheckpointError(f"'{path}' was written by `{obj.get('kind')}`, not `{kind}`; resume it with that "
                              "command.")
    return obj


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep the lines of epochs <= last_epoch (an interrupted epoch may have logged before its checkpoint)."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("epoch", 0) <= last_epoch]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep)))
