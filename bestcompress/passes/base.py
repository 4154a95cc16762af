"""The pass contract: small classes with `apply(model) -> model`, composed by a checking Pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from ..errors import BestcompressError, ModelError
from ..trace import graph_modules

_PASSES: dict[str, type["Pass"]] = {}


def register_pass(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: makes a pass available by its class name."""
    _PASSES[cls.__name__] = cls
    return cls


def list_passes() -> list[str]:
    return sorted(_PASSES)


def get_pass(name: str) -> type["Pass"]:
    if name not in _PASSES:
        raise ModelError(f"Unknown pass '{name}' (known: {', '.join(list_passes())}).")
    return _PASSES[name]


@dataclass
class PassContext:
    """What passes share: the recipe, an example input, time steps, and notes for the user."""

    recipe: object = None
    example_input: torch.Tensor | None = None
    time_steps: int | None = None
    notes: list[str] = field(default_factory=list)

    def note(self, msg: str) -> None:
        self.notes.append(msg)


class Pass:
    """One transformation. Subclasses set their options in __init__ and implement `apply`.

    `apply(model)` receives the traced model (a GraphModule, or an eager root holding GraphModules) and returns
    it transformed. Applying a pass twice must equal applying it once.
    """

    def __init__(self, ctx: PassContext | None = None) -> None:
        self.ctx = ctx or PassContext()

    @property
    def name(self) -> str:
        return type(self).__name__

    def apply(self, model: nn.Module) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise if the pass's `Ensures:` does not hold on `model`; default: nothing to check."""


class PassError(ModelError):
    """A pass failed; the message names the pass and, where known, the node."""


class Pipeline:
    """Runs passes in order; after each one lints and recompiles every graph and runs the pass's check."""

    def __init__(self, passes: list[Pass]) -> None:
        self.passes = list(passes)

    def apply(self, model: nn.Module) -> nn.Module:
        for p in self.passes:
            try:
                model = p.apply(model)
            except BestcompressError as e:
                raise type(e)(f"{p.name}: {e}") from None
            for where, gm in graph_modules(model):
                try:
                    gm.graph.lint()
                    gm.recompile()
                except Exception as e:  # a malformed graph is a bug in the pass: name it and the node
                    raise PassError(f"{p.name} left an invalid graph in '{where or '<root>'}': {e}") from e
            p.check(model)
        return model


def find_nodes(gm: fx.GraphModule, pred: Callable[[fx.Node], bool]) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if pred(n)]
