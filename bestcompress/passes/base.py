"""The pass contract: small classes with `apply(model) -> model`, composed by a checking Pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from ..errors import BestcompressError, ModelError, short_reason
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
    trace_report: object = None  # the TraceReport of the TraceModel pass, once it ran

    def note(self, msg: str) -> None:
        self.notes.append(msg)


class Pass:
    """One transformation. Subclasses set their options in __init__ and implement `apply`.

    `apply(model)` receives the traced model (a GraphModule, or an eager root holding GraphModules) and returns
    it transformed. Applying a pass twice must equal applying it once.
    """

    # The recipe switch that turns this pass on ("section.key", a bool), or None: the pass always runs.
    switch: str | None = None

    def __init__(self, ctx: PassContext | None = None) -> None:
        self.ctx = ctx or PassContext()

    @property
    def name(self) -> str:
        return type(self).__name__

    @classmethod
    def enabled(cls, recipe) -> bool:
        """Whether `recipe` asks for this pass (its `switch`; always, when the pass has none)."""
        if cls.switch is None or recipe is None:
            return True
        section, _, key = cls.switch.partition(".")
        return bool(getattr(getattr(recipe, section), key))

    @classmethod
    def from_recipe(cls, recipe, ctx: PassContext) -> "Pass":
        """The pass configured from its recipe section; the default reads nothing beyond the context (whose
        `recipe` a pass may read itself)."""
        return cls(ctx)

    def apply(self, model: nn.Module) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise if the pass's `Ensures:` does not hold on `model`; default: nothing to check."""


class PassError(ModelError):
    """A pass failed; the message names the pass and, where known, the node."""


# The binarization pipeline as data: pass names in the order they run (their switches say which a recipe runs).
DEFAULT_PIPELINE = ("CanonicalizeNeurons", "TraceModel", "BinarizeAttention", "InsertReversibleCouplings",
                    "BinarizeWeights", "ChannelsLastConvs")


class Pipeline:
    """Runs passes in order; after each one lints and recompiles every graph and runs the pass's check.

    A failure of any kind inside a pass is re-raised naming the pass and the passes that ran before it: a
    BestcompressError keeps its class (the user can fix it), any other exception becomes a PassError (a bug).
    """

    def __init__(self, passes: list[Pass]) -> None:
        self.passes = list(passes)

    @classmethod
    def from_recipe(cls, recipe, ctx: PassContext, names: tuple[str, ...] = DEFAULT_PIPELINE) -> "Pipeline":
        """The passes `recipe` switches on, each built from its own recipe section, in the order of `names`."""
        return cls([get_pass(n).from_recipe(recipe, ctx) for n in names if get_pass(n).enabled(recipe)])

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def _where(self, i: int) -> str:
        before = self.names[:i]
        return f"{self.passes[i].name} (after {', '.join(before)})" if before else f"{self.passes[i].name} (the first pass)"

    def apply(self, model: nn.Module) -> nn.Module:
        for i, p in enumerate(self.passes):
            try:
                model = p.apply(model)
                for where, gm in graph_modules(model):
                    try:
                        gm.graph.lint()
                        gm.recompile()
                    except Exception as e:  # a malformed graph is a bug in the pass: name it and the node
                        raise PassError(f"left an invalid graph in '{where or '<root>'}': {short_reason(e)}") from e
                p.check(model)
            except BestcompressError as e:
                raise type(e)(f"{self._where(i)}: {e}") from e
            except Exception as e:  # a bug, not the user's input: still say where it happened
                raise PassError(f"{self._where(i)} failed: {type(e).__name__}: {short_reason(e)}") from e
        return model


def find_nodes(gm: fx.GraphModule, pred: Callable[[fx.Node], bool]) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if pred(n)]
