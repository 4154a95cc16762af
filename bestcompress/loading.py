"""`load(path)`: the one loader for every file bestcompress reads a model from.

A full-precision checkpoint (bestcompress 'fp', timm/DeiT dict, plain state_dict, pickled module with trust), a
bestcompress binary checkpoint, or a packed `.bcz` artifact: each gives a `Loaded` that says which kind it was.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn


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


def load(path: str | os.PathLike, *, arch: str | None = None, model: str | None = None,
         model_kwargs: Mapping | None = None, trust: bool = False) -> Loaded:
    """Load the model stored in `path`, whatever kind of file it is.

    Args:
        path: a checkpoint or a packed .bcz artifact.
        arch: a zoo name, for a plain state_dict whose architecture should not be auto-detected.
        model: a user factory 'file.py:fn' or 'package.module:fn' that builds the full-precision model.
        model_kwargs: options for the zoo model or the factory.
        trust: allow unpickling arbitrary objects and importing code a file names (only for trusted files).
    Returns:
        A Loaded; `kind` says whether the model is full precision, binary or packed.
    """
    from .exporters.packed import is_packed, load_packed, read_header
    from .checkpoint import load_any
    from .recipe import recipe_from_dict

    path = Path(path)
    if is_packed(path):
        header = read_header(path)
        recipe = recipe_from_dict(header["recipe"], source=f"{path} (stored recipe)")
        info = {"kind": "packed", "path": str(path), "spec": header.get("spec"),
                "input_shape": header.get("input_shape"), "recipe": recipe, "extra": header.get("extra", {})}
        return Loaded("packed", load_packed(path), None, info)
    kind, net, info = load_any(path, trust=trust, arch=arch, model=model, model_kwargs=model_kwargs)
    return Loaded(kind, net, info.pop("source", None), info)
