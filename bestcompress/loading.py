"""`load(path)`: the one loader for every file bestcompress reads a model from.

A full-precision checkpoint (bestcompress 'fp', timm/DeiT dict, plain state_dict, pickled module with trust), a
bestcompress binary checkpoint, or a packed `.bcz` artifact: each gives a `Loaded` that says which kind it was.
No code a file names is imported or called unless the caller named that factory (`model=`) or passed `trust`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .building import arch_model, build_from_factory, build_from_spec, looks_like
from .checkpoint import FORMAT, check_format, extract_state_dict, load_state_dict_checked, structure_of
from .errors import CheckpointError, ModelError
from .fileio import load_checkpoint_file

KINDS = ("fp", "binary", "packed")


@dataclass
class Loaded:
    """What `load` found in a file.

    Attributes:
        kind: 'fp' (a full-precision model), 'binary' (a bestcompress binary checkpoint) or 'packed' (a .bcz).
        model: the model, in eval mode; binary layers present for 'binary' and 'packed'.
        source: for 'binary', the full-precision model it was made from (the default teacher); else None.
        info: path, spec, input_shape, recipe (a Recipe for binary/packed, None for fp) and extra metadata.
    """

    kind: str
    model: nn.Module
    source: nn.Module | None = None
    info: dict = field(default_factory=dict)

    @property
    def is_binary(self) -> bool:
        return self.kind in ("binary", "packed")


def _is_packed(path: Path) -> bool:
    from .exporters.packed import is_packed
    return is_packed(path)


def load(path: str | os.PathLike, *, arch: str | None = None, model: str | None = None,
         model_kwargs: Mapping | None = None, trust: bool = False, option: str = "--model",
         want: str | None = None, command: str = "this step") -> Loaded:
    """Load the model stored in `path`, whatever kind of file it is.

    Args:
        path: a checkpoint or a packed .bcz artifact.
        arch: a zoo name, for a plain state_dict whose architecture should not be auto-detected.
        model: a user factory 'file.py:fn' or 'package.module:fn' that builds the full-precision (source) model;
            the only way, besides `trust`, to build a model from user code.
        model_kwargs: options for the zoo model or the factory (default for a factory: the stored ones).
        trust: allow unpickling arbitrary objects and calling code a file names (only for trusted files).
        option: the command-line option that names a factory, for messages.
        want: 'fp' or 'binary' (binary or packed): another kind of file is refused with one sentence before any
            model is built; `command` names the step in that sentence.
    Returns:
        A Loaded; `kind` says whether the model is full precision, binary or packed.
    """
    path = Path(path)
    if _is_packed(path):
        _check_kind(path, "packed", want, command)
        return _load_packed(path, arch, model, model_kwargs, trust)
    obj = load_checkpoint_file(path, trust=trust)
    binary = isinstance(obj, Mapping) and obj.get("format") == FORMAT and obj.get("kind") == "binary"
    _check_kind(path, "binary" if binary else "fp", want, command)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        obj = check_format(obj, path)
        if obj.get("kind") == "binary":
            if arch is not None:
                _refuse_arch(path, arch, obj.get("spec"))
            binary, src, info = _binary_from_obj(obj, path, model, model_kwargs, trust, option)
            return Loaded("binary", binary, src, info)
    net = _fp_from_obj(obj, path, arch, model, model_kwargs, trust, option).eval()
    from .model_facts import model_input_shape
    extra = dict(obj.get("extra") or {}) if isinstance(obj, Mapping) and obj.get("format") == FORMAT else {}
    info = {"kind": "fp", "path": str(path), "spec": getattr(net, "bc_spec", None),
            "input_shape": model_input_shape(net), "recipe": None, "extra": extra}
    return Loaded("fp", net, None, info)


def load_model(path: str | os.PathLike | None = None, arch: str | None = None, model: str | None = None,
               model_kwargs: Mapping | None = None, trust: bool = False, allow_binary: bool = False,
               option: str = "--model") -> nn.Module:
    """The full-precision model, with its weights, in eval mode.

    Args:
        path: a full-precision checkpoint; None builds the model (from `arch` or `model`) with random weights.
        arch, model, model_kwargs, trust: as in `load`.
        allow_binary: give the full-precision source of a binary checkpoint instead of refusing it.
    Returns:
        The model; `model.bc_spec` records how to rebuild it.
    Raises:
        CheckpointError: a binary or packed file (unless allow_binary for a binary one).
    """
    if path is None:
        return _fp_from_obj(None, None, arch, model, model_kwargs, trust, option).eval()
    loaded = load(path, arch=arch, model=model, model_kwargs=model_kwargs, trust=trust, option=option,
                  want=None if allow_binary else "fp")
    if loaded.kind == "fp":
        return loaded.model
    if loaded.kind == "binary":
        return loaded.source
    _check_kind(Path(path), loaded.kind, "fp", "this step")
    return loaded.model  # pragma: no cover (_check_kind raised)


def load_binary(path: str | os.PathLike, trust: bool = False, model: str | None = None,
                model_kwargs: Mapping | None = None):
    """Rebuild a binary model saved by `save_binary`.

    Returns:
        (binary_model, source_fp_model, info) with both models in eval mode; info has kind, path, spec,
        input_shape, recipe (a Recipe) and extra.
    """
    path = Path(path)
    if _is_packed(path):
        raise CheckpointError(f"'{path}' is a packed .bcz artifact, which stores no full-precision source model; "
                              "give the binary checkpoint (.pt) it was exported from.")
    obj = check_format(load_checkpoint_file(path), path)
    if obj.get("kind") != "binary":
        raise CheckpointError(f"'{path}' is a full-precision bestcompress checkpoint, not a binary one; "
                              "binarize it first with `bestcompress binarize`.")
    return _binary_from_obj(obj, path, model, model_kwargs, trust, "--model")


# -------------------------------------------------------------------------------------------- the kinds

def _check_kind(path: Path, kind: str, want: str | None, command: str) -> None:
    """One sentence when a file holds another kind of model than the step takes (before anything is built)."""
    if want == "fp" and kind != "fp":
        what = "artifact" if kind == "packed" else "checkpoint"
        raise CheckpointError(f"'{path}' is already a binary bestcompress {what}; {command} takes a full-precision "
                              "model (fine-tune a binary one with `bestcompress distill`).")
    if want == "binary" and kind == "fp":
        raise CheckpointError(f"'{path}' is a full-precision model; {command} takes a binary checkpoint or .bcz, "
                              "so run `bestcompress binarize` first.")


def _refuse_arch(path: Path, arch: str, spec) -> None:
    stored = spec.get("arch") if isinstance(spec, Mapping) else None
    if stored != arch:
        raise CheckpointError(f"'{path}' is a binary checkpoint that records its own architecture "
                              f"({stored or 'a factory'}); leave out --arch {arch}.")


def _load_packed(path: Path, arch, model, model_kwargs, trust) -> Loaded:
    from .exporters.packed import load_packed, read_header
    from .recipe import recipe_from_dict
    header = read_header(path)
    if arch is not None:
        _refuse_arch(path, arch, header.get("spec"))
    recipe = recipe_from_dict(header["recipe"], source=f"{path} (stored recipe)")
    net = load_packed(path, factory=model, factory_kwargs=model_kwargs or None, trust=trust)
    info = {"kind": "packed", "path": str(path), "spec": header.get("spec"),
            "input_shape": header.get("input_shape"), "recipe": recipe, "extra": header.get("extra", {})}
    return Loaded("packed", net, None, info)


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


def _binary_from_obj(obj: Mapping, path: Path, model, model_kwargs, trust: bool, option: str):
    from .recipe import recipe_from_dict
    source_name = f"Checkpoint '{path}'"
    source = build_from_spec(obj["spec"], factory=model, factory_kwargs=model_kwargs or None, trust=trust,
                             source=source_name, option=option)
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


def _fp_from_obj(obj, path: Path | None, arch, model, model_kwargs, trust, option) -> nn.Module:
    model_kwargs = dict(model_kwargs or {})
    source = f"Checkpoint '{path}'" if path else "The checkpoint"
    if model is not None:
        net = build_from_factory(model, model_kwargs, option)
        if obj is not None:
            load_state_dict_checked(net, extract_state_dict(obj, source), source, f"model '{model}'")
            if isinstance(obj, Mapping) and obj.get("format") == FORMAT and obj.get("input_shape"):
                net.bc_input_shape = tuple(obj["input_shape"])
        return net
    if arch is not None:
        sd = extract_state_dict(obj, source) if obj is not None else None
        net = arch_model(arch, sd, model_kwargs)
        if sd is not None:
            hint = looks_like(sd)
            try:
                load_state_dict_checked(net, sd, source, f"model '{arch}'")
            except CheckpointError as e:
                raise CheckpointError(str(e).rstrip(".") + hint + ".") from None
        return net
    if obj is None:
        raise ModelError(f"Give a checkpoint, --arch NAME or {option} FILE.py:FUNCTION to build the model.")
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        net = build_from_spec(obj["spec"], trust=trust, source=source, option=option)
        load_state_dict_checked(net, obj["state_dict"], source, "the model it records")
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
                              f"{', '.join(list_models())}) or {option} FILE.py:FUNCTION.")
    name, cfg = found
    net = create_model(name, **{**cfg, **model_kwargs})
    load_state_dict_checked(net, sd, source, f"model '{name}'")
    return net
