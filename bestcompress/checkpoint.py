"""The bestcompress checkpoint format (save_fp, save_binary) and state-dict extraction from any checkpoint.

Reading files safely lives in fileio.py, building models in building.py, the one loader in loading.py.

A bestcompress checkpoint is a dict that `torch.load(weights_only=True)` reads (tensors, str, numbers, bool,
None, lists, dicts only):

    {"format": "bestcompress", "version": 1, "kind": "fp" | "binary",
     "spec": {"arch": name, "kwargs": {...}} | {"factory": "file.py:fn", "kwargs": {...}} | {"pickle": path},
     "input_shape": [...], "state_dict": {...},
     "recipe": {...}, "source_state_dict": {...},   # binary only: how it was made and from what (the teacher)
     "structure": [...],                            # binary only: module names/classes, to check the rebuild
     "extra": {...}}

A binary checkpoint is rebuilt deterministically (loading.py): the source model from its spec and `source_state_dict`,
then `binarize` with the stored recipe, then the binary `state_dict` loaded strictly.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ModelError
from .state_dict import strip_prefixes
# Re-exported for callers that import them from here; they live in the file I/O leaf module.
from .fileio import atomic_save, atomic_write, load_checkpoint_file  # noqa: F401

FORMAT = "bestcompress"
VERSION = 1
STATE_DICT_KEYS = ("state_dict", "model", "net", "module", "state_dict_ema", "model_ema")  # non-EMA first


# ------------------------------------------------------------------------------------ state-dict extraction

def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items())


def extract_state_dict(obj, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint object.

    Handles bestcompress checkpoints, timm/DeiT dicts (`state_dict`, `model`, `net`, `state_dict_ema`,
    `model_ema`), plain state_dicts and whole modules; strips DDP `module.` and torch.compile `_orig_mod.`.

    Args:
        obj: what `load_checkpoint_file` returned.
        source: how to name the checkpoint in error messages.
    Returns:
        A plain {name: tensor} dict.
    """
    if isinstance(obj, nn.Module):
        return strip_prefixes(obj.state_dict())
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return dict(obj["state_dict"])
    if _is_state_dict(obj):
        return strip_prefixes(obj)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or _is_state_dict(inner):
                return extract_state_dict(inner, source)
        keys = ", ".join(map(str, list(obj)[:8])) or "none"
        raise CheckpointError(f"{source} holds no state_dict (a dict with keys {keys}); expected tensors or a "
                              f"'state_dict'/'model' entry.")
    raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict or model.")


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def load_state_dict_checked(model: nn.Module, state_dict: Mapping, source: str, target: str) -> None:
    """`model.load_state_dict(strict=True)` with a one-sentence error naming the first offending key.

    A missing `num_batches_tracked` (absent from some checkpoints, carries no weights) is tolerated.
    """
    own = model.state_dict()
    state_dict = dict(state_dict)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = own[k]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and _shape(own[k]) != _shape(state_dict[k])]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{source} does not fit {target}: '{k}' has shape {list(_shape(state_dict[k]))} in the "
                              f"checkpoint but {list(_shape(own[k]))} in the model ({len(wrong)} mismatched).")
    if missing:
        k = missing[0]
        raise CheckpointError(f"{source} does not fit {target}: the model's '{k}' (shape {list(_shape(own[k]))}) "
                              f"is missing from the checkpoint ({len(missing)} missing, {len(unexpected)} unexpected).")
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(f"{source} does not fit {target}: the checkpoint's '{k}' (shape "
                              f"{list(_shape(state_dict[k]))}) has no place in the model "
                              f"({len(unexpected)} unexpected).")
    model.load_state_dict(state_dict, strict=True)


def check_finite(state_dict: Mapping, source: str) -> None:
    """Raise a CheckpointError naming the first tensor that holds NaN or Inf."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source} holds non-finite weights: '{key}' has {bad} NaN/Inf value"
                                  f"{'s' if bad != 1 else ''} of {value.numel()}; retrain or restore the file.")


# ------------------------------------------------------------------------------------ the bestcompress format

def _plain_shape(shape) -> list[int] | None:
    return [int(s) for s in shape] if shape is not None else None


def _spec_of(*models: nn.Module) -> dict:
    for m in models:
        spec = getattr(m, "bc_spec", None)
        if spec:
            return dict(spec)
    raise ModelError("The model records no bc_spec (how to rebuild it); build it with load_model, create_model "
                     "or a --model factory.")


def _tensors(state_dict: Mapping) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def save_fp(model: nn.Module, path: str | os.PathLike, extra: Mapping | None = None) -> Path:
    """Save a full-precision model as a bestcompress 'fp' checkpoint (atomically).

    Args:
        model: a model carrying `bc_spec` (from load_model/create_model).
        path: the output file.
        extra: any weights_only-safe metadata (epoch, accuracy, ...).
    """
    from .model_facts import model_input_shape
    payload = {"format": FORMAT, "version": VERSION, "kind": "fp", "spec": _spec_of(model),
               "input_shape": _plain_shape(model_input_shape(model)), "state_dict": _tensors(model.state_dict()),
               "extra": dict(extra or {})}
    return atomic_save(payload, path)


def save_binary(binary_model: nn.Module, source_model: nn.Module, path: str | os.PathLike,
                extra: Mapping | None = None) -> Path:
    """Save a binary model and the full-precision model it was made from (atomically).

    Args:
        binary_model: `binarize(...).model` (carries bc_recipe and bc_input_shape), possibly trained since.
        source_model: the full-precision model it was binarized from (carries bc_spec); the default teacher.
        path: the output file.
        extra: any weights_only-safe metadata.
    """
    recipe = getattr(binary_model, "bc_recipe", None)
    if recipe is None:
        raise ModelError("The model records no bc_recipe; save_binary takes the model that binarize() returned.")
    from .model_facts import model_input_shape
    shape = getattr(binary_model, "bc_input_shape", None) or model_input_shape(source_model)
    payload = {"format": FORMAT, "version": VERSION, "kind": "binary", "spec": _spec_of(source_model, binary_model),
               "input_shape": _plain_shape(shape), "state_dict": _tensors(binary_model.state_dict()),
               "recipe": dict(recipe), "source_state_dict": _tensors(source_model.state_dict()),
               "structure": structure_of(binary_model), "extra": dict(extra or {})}
    return atomic_save(payload, path)


def check_format(obj, path: Path) -> dict:
    """The checkpoint dict, after checking it is the bestcompress format in the version this code reads."""
    if not (isinstance(obj, Mapping) and obj.get("format") == FORMAT):
        raise CheckpointError(f"'{path}' is not a bestcompress checkpoint (make one with `bestcompress binarize`).")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"'{path}' has bestcompress format version {obj.get('version')!r}; this "
                              f"bestcompress reads version {VERSION}.")
    return dict(obj)


def structure_of(model: nn.Module) -> list[str]:
    """A fingerprint of a model's structure: every module's name and class (a class's `structure_name` where it
    computes as the parent it names), and each traced graph's code."""
    out = []
    for name, m in model.named_modules():
        entry = f"{name}:{getattr(type(m), 'structure_name', None) or type(m).__name__}"
        if isinstance(m, torch.fx.GraphModule):
            entry += ":" + hashlib.sha1(m.code.encode()).hexdigest()[:16]
        out.append(entry)
    return out
