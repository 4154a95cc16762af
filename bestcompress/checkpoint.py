"""Loading and saving: safe torch loading, state_dict extraction, atomic writes, the bestcompress format.

A bestcompress checkpoint is a dict that `torch.load(weights_only=True)` reads (tensors, str, numbers, bool,
None, lists, dicts only):

    {"format": "bestcompress", "version": 1, "kind": "fp" | "binary",
     "spec": {"arch": name, "kwargs": {...}} | {"factory": "file.py:fn", "kwargs": {...}} | {"pickle": path},
     "input_shape": [...], "state_dict": {...},
     "recipe": {...}, "source_state_dict": {...},   # binary only: how it was made and from what (the teacher)
     "structure": [...],                            # binary only: module names/classes, to check the rebuild
     "extra": {...}}

A binary checkpoint is rebuilt deterministically: the source model from its spec and `source_state_dict`,
then `binarize` with the stored recipe, then the binary `state_dict` loaded strictly.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import hashlib
import os
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ModelError
from .fileio import atomic_save, atomic_write  # noqa: F401 (callers import them from here until moved)

FORMAT = "bestcompress"
VERSION = 1
STATE_DICT_KEYS = ("state_dict", "model", "net", "module", "state_dict_ema", "model_ema")  # non-EMA first
STRIP_PREFIXES = ("module.", "_orig_mod.")
# Harmless non-tensor objects common in training checkpoints (timm saves `args` as a Namespace).
_SAFE_GLOBALS: list = [argparse.Namespace]
try:
    import numpy as _np
    _SAFE_GLOBALS += [_np.dtype, _np.ndarray, type(_np.dtype("float32")), type(_np.dtype("float64")),
                      type(_np.dtype("int64"))]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    _SAFE_GLOBALS += [_reconstruct, scalar]
except ImportError:  # pragma: no cover
    pass


# ------------------------------------------------------------------------------------------------ writing

# ------------------------------------------------------------------------------------------------ reading

def _sniff(path: Path, head: bytes) -> None:
    """Raise a CheckpointError when `path` is clearly not a readable torch file."""
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"Checkpoint file '{path}' is truncated or corrupted (its zip archive is "
                                  "incomplete); save or download it again.")
        return
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # a pickle (legacy torch format)
        return
    try:
        head.decode("utf-8")
        text = True
    except UnicodeDecodeError:
        text = False
    what = "a text file" if text else "an unknown binary format"
    raise CheckpointError(f"'{path}' is not a PyTorch checkpoint (it looks like {what}); give a file written "
                          "by torch.save.")


def load_checkpoint_file(path: str | os.PathLike, trust: bool = False):
    """Read a torch checkpoint safely (on the CPU).

    Args:
        path: a file written by torch.save.
        trust: allow arbitrary pickled objects (a whole nn.Module). Unpickling can run code: only for trusted files.
    Returns:
        The loaded object.
    Raises:
        CheckpointError: missing, empty, truncated or non-torch file, or pickled code without `trust`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint file '{path}' does not exist.")
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint file '{path}' is empty.")
    with open(path, "rb") as f:
        head = f.read(64)
    _sniff(path, head)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/... for bad files
        msg = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        if unsafe and not trust:
            raise CheckpointError(
                f"Checkpoint '{path}' contains pickled Python objects ({unsafe.group(1)}) that can run code when "
                "loaded; pass --trust-checkpoint only if you trust where the file came from.") from None
        first = msg.strip().splitlines()[0][:160] if msg.strip() else type(e).__name__
        raise CheckpointError(f"Checkpoint file '{path}' could not be read; it is truncated or corrupted "
                              f"({type(e).__name__}: {first}).") from None


def _strip_prefixes(state_dict: Mapping) -> dict:
    out = dict(state_dict)
    for prefix in STRIP_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


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
        return _strip_prefixes(obj.state_dict())
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return dict(obj["state_dict"])
    if _is_state_dict(obj):
        return _strip_prefixes(obj)
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


# ------------------------------------------------------------------------------------------- building models

def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The function named by 'path/to/file.py:fn' or 'package.module:fn'."""
    target, sep, fn_name = spec.rpartition(":")
    if not sep or not target or not fn_name:
        raise ModelError(f"--model expects FILE.py:FUNCTION or package.module:FUNCTION, got '{spec}'.")
    if target.endswith(".py") or "/" in target or os.sep in target:
        file = Path(target)
        if not file.is_file():
            raise ModelError(f"Model file '{file}' does not exist.")
        name = "bc_user_model_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is None:
            import_spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(import_spec)
            sys.modules[name] = module  # dataclasses and pickling look classes up here
            try:
                import_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise ModelError(f"Importing model file '{file}' failed ({type(e).__name__}: {e}).") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ModelError(f"Cannot import module '{target}' for --model ({type(e).__name__}: {e}).") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelError(f"'{target}' has no function '{fn_name}' to build the model.")
    return fn


def _factory_key(spec: str) -> str:
    """The spec with a file path made absolute, so the model can be rebuilt from elsewhere."""
    target, _, fn_name = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        target = str(Path(target).resolve())
    return f"{target}:{fn_name}"


def build_from_factory(spec: str, kwargs: Mapping | None = None) -> nn.Module:
    """Call a user factory 'file.py:fn' with kwargs; the model gets its bc_spec."""
    fn = load_factory(spec)
    kwargs = dict(kwargs or {})
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise ModelError(f"Model factory '{spec}' raised {type(e).__name__}: {e}.") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"Model factory '{spec}' returned a {type(model).__name__}, not a torch nn.Module.")
    model.bc_spec = {"factory": _factory_key(spec), "kwargs": kwargs}
    return model


def build_from_spec(spec: Mapping, trust: bool = False) -> nn.Module:
    """Rebuild a model (random weights) from a `bc_spec`."""
    if not isinstance(spec, Mapping):
        raise CheckpointError(f"The stored model spec {spec!r} is not a mapping.")
    if "arch" in spec:
        from .zoo import create_model
        return create_model(spec["arch"], **dict(spec.get("kwargs") or {}))
    if "factory" in spec:
        return build_from_factory(spec["factory"], spec.get("kwargs"))
    if "pickle" in spec:
        obj = load_checkpoint_file(spec["pickle"], trust=trust)
        if not isinstance(obj, nn.Module):
            raise CheckpointError(f"'{spec['pickle']}' no longer holds a pickled model.")
        obj.bc_spec = {"pickle": spec["pickle"]}
        return obj
    raise CheckpointError(f"The stored model spec {dict(spec)!r} names no arch, factory or pickle.")


def _arch_model(arch: str, state_dict: Mapping | None, model_kwargs: Mapping) -> nn.Module:
    from .zoo import create_model, get_entry
    entry = get_entry(arch)
    cfg = {}
    if state_dict is not None and entry.detect is not None:
        cfg = dict(entry.detect(state_dict) or {})
    cfg.update(model_kwargs)
    return create_model(arch, **cfg)


def _looks_like(state_dict: Mapping) -> str:
    from .zoo import detect_architecture
    found = detect_architecture(state_dict)
    return f"; it looks like a '{found[0]}' checkpoint" if found else ""


def _load_model_from_obj(obj, path: Path | None, arch, model, model_kwargs, trust,
                         allow_binary: bool = True) -> nn.Module:
    model_kwargs = dict(model_kwargs or {})
    source = f"Checkpoint '{path}'" if path else "The checkpoint"
    if not allow_binary and isinstance(obj, Mapping) and obj.get("format") == FORMAT and obj.get("kind") == "binary":
        raise CheckpointError(f"{source} is already a binary bestcompress checkpoint; give the full-precision one.")
    if model is not None:
        net = build_from_factory(model, model_kwargs)
        if obj is not None:
            load_state_dict_checked(net, extract_state_dict(obj, source), source, f"model '{model}'")
        return net
    if arch is not None:
        sd = extract_state_dict(obj, source) if obj is not None else None
        net = _arch_model(arch, sd, model_kwargs)
        if sd is not None:
            hint = _looks_like(sd)
            try:
                load_state_dict_checked(net, sd, source, f"model '{arch}'")
            except CheckpointError as e:
                raise CheckpointError(str(e).rstrip(".") + hint + ".") from None
        return net
    if obj is None:
        raise ModelError("Give a checkpoint, --arch NAME or --model FILE.py:FUNCTION to build the model.")
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        net = build_from_spec(obj["spec"], trust=trust)
        sd = obj["state_dict"] if obj.get("kind") == "fp" else obj["source_state_dict"]
        load_state_dict_checked(net, sd, source, "the model it records")
        if obj.get("input_shape"):
            net.bc_input_shape = tuple(obj["input_shape"])
        return net
    if isinstance(obj, nn.Module):  # only reachable with trust (load_checkpoint_file checks)
        obj.bc_spec = {"pickle": str(path.resolve()) if path else ""}
        return obj
    from .zoo import create_model, detect_architecture, list_models
    sd = extract_state_dict(obj, source)
    found = detect_architecture(sd)
    if found is None:
        raise CheckpointError(f"{source} matches no known architecture; pass --arch NAME (one of "
                              f"{', '.join(list_models())}) or --model FILE.py:FUNCTION.")
    name, cfg = found
    net = create_model(name, **{**cfg, **model_kwargs})
    load_state_dict_checked(net, sd, source, f"model '{name}'")
    return net


def load_model(path: str | os.PathLike | None = None, arch: str | None = None, model: str | None = None,
               model_kwargs: Mapping | None = None, trust: bool = False, allow_binary: bool = True) -> nn.Module:
    """The full-precision source model, with its weights, in eval mode.

    Args:
        path: a checkpoint (bestcompress, timm/DeiT dict, plain state_dict, or a pickled module with `trust`);
            None builds the model with random weights.
        arch: a zoo name; sizes not in `model_kwargs` are read from the checkpoint's shapes.
        model: a user factory 'path/to/file.py:fn' or 'package.module:fn' (called with `model_kwargs`).
        model_kwargs: options for the zoo model or the factory.
        trust: allow unpickling arbitrary objects (only for trusted files).
        allow_binary: if False, a binary bestcompress checkpoint is an error instead of giving its source model.
    Returns:
        The model; `model.bc_spec` records how to rebuild it ({"arch"|"factory"|"pickle": ...}).
        Without arch/model, the architecture is detected from the state_dict. A binary bestcompress checkpoint
        gives the full-precision model it was made from.
    """
    path = Path(path) if path is not None else None
    obj = load_checkpoint_file(path, trust=trust) if path is not None else None
    net = _load_model_from_obj(obj, path, arch, model, model_kwargs, trust, allow_binary)
    return net.eval()


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


def _check_format(obj, path: Path) -> dict:
    if not (isinstance(obj, Mapping) and obj.get("format") == FORMAT):
        raise CheckpointError(f"'{path}' is not a bestcompress checkpoint (make one with `bestcompress binarize`).")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"'{path}' has bestcompress format version {obj.get('version')!r}; this "
                              f"bestcompress reads version {VERSION}.")
    return dict(obj)


def structure_of(model: nn.Module) -> list[str]:
    """A fingerprint of a model's structure: every module's name and class, and each traced graph's code."""
    out = []
    for name, m in model.named_modules():
        entry = f"{name}:{type(m).__name__}"
        if isinstance(m, torch.fx.GraphModule):
            entry += ":" + hashlib.sha1(m.code.encode()).hexdigest()[:16]
        out.append(entry)
    return out


def _rebuild_binary(source: nn.Module, recipe, shape, state_dict: Mapping, structure, source_name: str):
    """binarize(source, recipe) with the stored weights loaded strictly (binarize runs its passes on a
    FakeTensor input, so rebuilding a large model takes seconds)."""
    from .convert import binarize
    from .model_facts import example_input_for
    example = example_input_for(source, shape) if shape is not None else None
    model = binarize(source, recipe=recipe, example_input=example, input_shape=shape).model
    if structure is not None and structure_of(model) != list(structure):
        raise CheckpointError(f"{source_name} was saved by a bestcompress whose passes built a different "
                              "model structure; binarize the source model again with this version.")
    load_state_dict_checked(model, state_dict, source_name, "the binarized model")
    return model


def _binary_from_obj(obj: Mapping, path: Path, trust: bool):
    from .recipe import recipe_from_dict
    source_name = f"Checkpoint '{path}'"
    source = build_from_spec(obj["spec"], trust=trust)
    load_state_dict_checked(source, obj["source_state_dict"], source_name, "its source model")
    shape = tuple(obj["input_shape"]) if obj.get("input_shape") else None
    if shape is not None:
        source.bc_input_shape = shape
    source.eval()
    recipe = recipe_from_dict(obj["recipe"], source=f"{path} (stored recipe)")
    binary = _rebuild_binary(source, recipe, shape, obj["state_dict"], obj.get("structure"), source_name)
    binary.eval()
    info = {"kind": "binary", "path": str(path), "spec": obj["spec"], "input_shape": shape, "recipe": recipe,
            "extra": dict(obj.get("extra") or {})}
    return binary, source, info


def load_binary(path: str | os.PathLike, trust: bool = False):
    """Rebuild a binary model saved by `save_binary`.

    Args:
        path: a bestcompress 'binary' checkpoint.
        trust: needed only when the source model was a pickled module.
    Returns:
        (binary_model, source_fp_model, info) with both models in eval mode; info has kind, path, spec,
        input_shape, recipe (a Recipe) and extra.
    """
    path = Path(path)
    obj = _check_format(load_checkpoint_file(path), path)
    if obj.get("kind") != "binary":
        raise CheckpointError(f"'{path}' is a full-precision bestcompress checkpoint, not a binary one; "
                              "binarize it first with `bestcompress binarize`.")
    return _binary_from_obj(obj, path, trust)


def load_any(path: str | os.PathLike, trust: bool = False, arch: str | None = None, model: str | None = None,
             model_kwargs: Mapping | None = None):
    """A binary or full-precision model from any checkpoint, for commands that accept both.

    Returns:
        (kind, model, info): kind is "binary" (bestcompress binary checkpoint) or "fp"; info as in load_binary
        (recipe None for fp), plus "source" (the full-precision source model) for a binary checkpoint.
    """
    path = Path(path)
    obj = load_checkpoint_file(path, trust=trust)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        obj = _check_format(obj, path)
        if obj.get("kind") == "binary" and arch is None and model is None:
            binary, source, info = _binary_from_obj(obj, path, trust)
            return "binary", binary, {**info, "source": source}
    net = _load_model_from_obj(obj, path, arch, model, model_kwargs, trust).eval()
    from .model_facts import model_input_shape
    info = {"kind": "fp", "path": str(path), "spec": getattr(net, "bc_spec", None),
            "input_shape": model_input_shape(net), "recipe": None,
            "extra": dict(obj.get("extra") or {}) if isinstance(obj, Mapping) and obj.get("format") == FORMAT else {}}
    return "fp", net, info
