"""A training run on disk: the per-epoch checkpoint `<run_dir>/last.pt`, RNG states and `metrics.jsonl`.

`last.pt` is written atomically after every epoch and loads with `torch.load(weights_only=True)`: model state,
optimizer, scheduler, RNG states (torch, CUDA, numpy, python), the epoch just finished, the best epoch (and its
weights when a validation set picks it) and every option that shapes the run (`RUN_OPTIONS`: the recipe after
overrides, epochs, seed, data, encoding, subset, batch limit, teacher). The data order does not depend on it (each
epoch's permutation comes from seed + epoch), so a run resumed from epoch e repeats exactly what an uninterrupted
run would have done; `resume_options` restores the options and refuses ones that differ.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint_file
from ..errors import CheckpointError
from ..fileio import atomic_save, atomic_write

RUN_FORMAT = "bestcompress-run"
RUN_VERSION = 2
RUN_OPTIONS = ("recipe", "epochs", "seed", "data", "encoding", "subset", "limit_batches", "teacher")


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


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def save_run_checkpoint(path: Path, *, kind: str, epoch: int, model_state: dict, optimizer, scheduler,
                        best: dict, options: dict, world_size: int) -> Path:
    """Write last.pt. `best` holds 'epoch', 'val_top1' and, when a validation set picks it, 'model' (weights)."""
    best = {**best, **({"model": _cpu(best["model"])} if best.get("model") is not None else {})}
    payload = {"format": RUN_FORMAT, "version": RUN_VERSION, "kind": kind, "epoch": epoch,
               "epochs": options["epochs"], "model": _cpu(model_state), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "rng": rng_state(), "best": best, "options": options,
               "recipe": options["recipe"], "seed": options["seed"], "world_size": world_size}
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


def run_options(path, kind: str) -> dict:
    """The options a run in `path` (its last.pt) was started with ({} when it records none)."""
    options = load_run_checkpoint(path, kind).get("options")
    return options if isinstance(options, dict) else {}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_options(stored: dict | None, given: dict, path) -> dict:
    """The options of the run in `path`, after checking the ones given again (None: not given) against them.

    Raises:
        CheckpointError: the file records no options, or a given option differs from the run's.
    """
    if not isinstance(stored, dict):
        raise CheckpointError(f"'{path}' records no run options (an older bestcompress wrote it); start a new run.")
    conflicts = []
    for key in RUN_OPTIONS:
        value = given.get(key)
        if value is None:
            continue
        if key == "recipe":
            old, new = _flat(stored.get("recipe") or {}), _flat(value)
            conflicts += [f"recipe key {k} ({new.get(k)!r}, the run has {old.get(k)!r})"
                          for k in sorted(set(old) | set(new)) if k != "name" and old.get(k) != new.get(k)]
        elif key == "teacher":
            if (value or {}).get("sha1") != (stored.get("teacher") or {}).get("sha1"):
                conflicts.append(f"the teacher ({(value or {}).get('name')}, the run used "
                                 f"{(stored.get('teacher') or {}).get('name')})")
        elif value != stored.get(key):
            conflicts.append(f"{key} ({value!r}, the run has {stored.get(key)!r})")
    if conflicts:
        raise CheckpointError(f"--resume continues the run in '{path}' with the options it was started with, but "
                              f"these differ: {'; '.join(conflicts)} (drop them, or start a new run folder).")
    return dict(stored)


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of metrics.jsonl; a torn last line (a run killed while appending) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise CheckpointError(f"'{path}' line {i + 1} is not a JSON record; remove that line or the file.") \
                from None
    return records


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep the lines of epochs <= last_epoch (an interrupted epoch may have logged before its checkpoint)."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("epoch", 0) <= last_epoch]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep)))


def model_fingerprint(model) -> str:
    """SHA-1 of a model's state (names, shapes, values): says whether a resumed run has the same teacher."""
    import hashlib
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
