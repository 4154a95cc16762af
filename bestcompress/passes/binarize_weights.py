"""BinarizeWeights: every Conv1d/Conv2d/Linear becomes its 1-bit Brevitas layer, except the kept ones."""
from __future__ import annotations

import fnmatch

import torch
from torch import fx, nn

from ..errors import ModelError
from ..nn.binary import BINARY_SWAP_RULES, is_binary_layer
from .base import Pass, PassContext, PassError, register_pass
from .shapes import record_calls


def _set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def weight_layers_in_call_order(model: nn.Module, example_input: torch.Tensor | None) -> list[str]:
    """Qualified names of the Conv/Linear (float or binary) modules in the order the forward calls them."""
    kinds = tuple(BINARY_SWAP_RULES) + tuple(BINARY_SWAP_RULES.values())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    if example_input is None:
        return list(layers)
    order = record_calls(model, layers, example_input).order
    return order + [n for n in layers if n not in order]


def _output_layers(gm: fx.GraphModule, kinds: tuple) -> list[str]:
    """Weight layers nearest the graph output: walk back from the output through non-weight ops."""
    found, seen = [], set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), kinds):
            found.append(node.target)
            continue
        stack.extend(node.all_input_nodes)
    return found


def head_layers(model: nn.Module, order: list[str]) -> list[str]:
    """Classifier heads: the weight layers that feed the output with no other weight layer in between
    (both heads of a dual-head model); else Linear layers named like a head; else the last layer called."""
    kinds = tuple(BINARY_SWAP_RULES) + tuple(BINARY_SWAP_RULES.values())
    if isinstance(model, fx.GraphModule):
        found = _output_layers(model, kinds)
        if found:
            return sorted(found, key=lambda n: order.index(n) if n in order else len(order))
    named = [n for n in order if isinstance(model.get_submodule(n), (nn.Linear,) + tuple(BINARY_SWAP_RULES.values()))
             and n.rpartition(".")[2].startswith("head")]
    if named:
        return named
    return order[-1:]


def resolve_keep_fp(model: nn.Module, patterns: tuple[str, ...], example_input) -> set[str]:
    """Names the recipe keeps full precision: 'first', 'heads', or fnmatch patterns on qualified names."""
    order = weight_layers_in_call_order(model, example_input)
    keep: set[str] = set()
    for pat in patterns:
        if pat == "first":
            keep.update(order[:1])
        elif pat in ("heads", "head", "last"):
            keep.update(head_layers(model, order) if pat != "last" else order[-1:])
        else:
            keep.update(n for n in order if fnmatch.fnmatchcase(n, pat))
    return keep


@register_pass
class BinarizeWeights(Pass):
    """Swap every Conv/Linear for its binary Brevitas layer, except those the recipe keeps full precision.

    Requires: a model (traced or not) whose weight layers are nn.Conv1d/Conv2d/Linear.
    Ensures: every non-kept weight layer is a binary layer with the same `weight`/`bias` values; kept ones untouched.
    """

    switch = "weights.binarize"

    @classmethod
    def from_recipe(cls, recipe, ctx: PassContext) -> "BinarizeWeights":
        w = recipe.weights
        return cls(ctx, keep_full_precision=w.keep_full_precision, scaled=w.quantizer == "sign_scaled")

    def __init__(self, ctx: PassContext | None = None, keep_full_precision=("first", "heads"),
                 scaled: bool = False, rules: dict[type, type] | None = None) -> None:
        super().__init__(ctx)
        self.keep_patterns = tuple(keep_full_precision)
        self.scaled = scaled
        self.rules = dict(rules or BINARY_SWAP_RULES)
        self.kept: set[str] = set()
        self.swapped: list[str] = []

    def apply(self, model: nn.Module) -> nn.Module:
        self.kept = resolve_keep_fp(model, self.keep_patterns, self.ctx.example_input)
        candidates = [(n, m) for n, m in model.named_modules() if type(m) in self.rules or is_binary_layer(m)]
        if not candidates:
            raise ModelError("the model has no Conv1d, Conv2d or Linear layer to binarize.")
        for name, module in candidates:
            if name in self.kept or is_binary_layer(module):
                continue
            _set_submodule(model, name, self.rules[type(module)].from_float(module, scaled=self.scaled))
            self.swapped.append(name)
        if not self.swapped and not any(is_binary_layer(m) for m in model.modules()):
            raise ModelError("every Conv/Linear layer of the model is kept full precision by the recipe "
                             "(weights.keep_full_precision); nothing would be binarized.")
        self.ctx.note(f"BinarizeWeights: {len(self.swapped)} layers binarized, kept full precision: "
                      f"{', '.join(sorted(self.kept)) or 'none'}")
        return model

    def check(self, model: nn.Module) -> None:
        for name in self.swapped:
            m = model.get_submodule(name)
            if not is_binary_layer(m):
                raise PassError(f"BinarizeWeights: '{name}' is not binary after the swap.")
