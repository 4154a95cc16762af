"""BinarizeWeights: every Conv1d/Conv2d/Linear becomes its 1-bit Brevitas layer, except the kept ones."""
from __future__ import annotations

import fnmatch

import torch
from torch import fx, nn

from ..errors import ModelError
from ..nn.binary import BINARY_SWAP_RULES, is_binary_layer
from ..nn.fast_norm import use_channel_last_batchnorm
from ..plain_layers import plain_layer, random_input
from .base import Pass, PassContext, PassError, register_pass
from .shapes import record_calls


def _plain_parent(module: nn.Module, rules: dict[type, type]) -> type | None:
    """The swap-rule class (Conv1d/Conv2d/Linear) that `module`'s class derives from, or None."""
    return next((base for base in type(module).__mro__ if base in rules), None)


def _plain_copy(module: nn.Module, parent: type) -> nn.Module:
    plain = plain_layer(module, parent)
    with torch.no_grad():
        plain.weight.copy_(module.weight)
        if module.bias is not None:
            plain.bias.copy_(module.bias)
    return plain


def subclass_mismatch(module: nn.Module, parent: type, seed: int = 0,
                      reference: nn.Module | None = None) -> str | None:
    """None when a subclass of Conv1d/Conv2d/Linear computes exactly as its parent class would with the same
    weight and bias (checked on seeded random input, like the neuron swaps), else the reason in a few words.
    `reference`: compare with this layer instead of the parent (the binary layer, for already 1-bit code)."""
    g = torch.Generator().manual_seed(seed)
    try:
        x = random_input(module, parent, g)
        with torch.no_grad():
            got = module(x)
            # the parent's computation with this module's parameters
            expected = (reference if reference is not None else _plain_copy(module, parent))(x)
    except Exception as e:  # a forward that needs more than one tensor, or other inputs
        return f"it could not be run on a random input for the check ({type(e).__name__})"
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return "its forward returns something other than its parent's output"
    if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
        return f"its forward computes something else than {parent.__name__} (max difference " \
               f"{(got - expected).abs().max().item():.3g} on random input)"
    return None


def _was_subclass(name: str, candidates: list) -> bool:
    return any(n == name and type(m) is not parent for n, m, parent in candidates)


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


def output_layers(gm: fx.GraphModule, kinds: tuple) -> list[str]:
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
        found = output_layers(model, kinds)
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

    Requires: a model (traced or not) whose weight layers are nn.Conv1d/Conv2d/Linear or subclasses of them.
    Ensures: every weight layer the recipe does not keep is a binary layer with the same `weight`/`bias` values,
    subclasses included when they compute as their parent class on random input; each subclass that does not
    is kept with a note naming its class and why; kept ones untouched.
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
        self.refused: dict[str, str] = {}  # subclassed layers that compute differently, with the reason

    def apply(self, model: nn.Module) -> nn.Module:
        self.kept = resolve_keep_fp(model, self.keep_patterns, self.ctx.example_input)
        self.refused: dict[str, str] = {}
        self.swapped = []
        self.already_binary: list[str] = []  # subclasses that compute as the binary layer already does
        candidates = [(n, m, _plain_parent(m, self.rules)) for n, m in model.named_modules()
                      if is_binary_layer(m) or _plain_parent(m, self.rules) is not None]
        if not candidates:
            raise ModelError("the model has no Conv1d, Conv2d or Linear layer to binarize.")
        for name, module, parent in candidates:
            if name in self.kept or is_binary_layer(module):
                continue
            binary = None
            if type(module) is not parent:  # a subclass (IR-Net conv, a wrapper, a parametrized layer)
                why = subclass_mismatch(module, parent)
                if why:
                    # Public binary code (BESTformer's IRConv2d) already computes sign(standardized W): it is
                    # the binary layer itself, so it is swapped, with a note, instead of kept full precision.
                    binary = self.rules[parent].from_float(module, scaled=self.scaled)
                    if subclass_mismatch(module, parent, reference=binary.eval()) is not None:
                        self.refused[name] = f"{type(module).__name__} subclasses {parent.__name__} but {why}"
                        continue
                    self.already_binary.append(name)
                    binary.train(module.training)
            _set_submodule(model, name, binary or self.rules[parent].from_float(module, scaled=self.scaled))
            self.swapped.append(name)
        if not self.swapped and not any(is_binary_layer(m) for m in model.modules()):
            if self.refused:
                first = next(iter(self.refused.items()))
                raise ModelError(f"no layer could be binarized: the recipe keeps {', '.join(sorted(self.kept)) or 'none'}"
                                 f" and {len(self.refused)} layer(s) compute differently from their parent class "
                                 f"('{first[0]}': {first[1]}).")
            raise ModelError("every Conv/Linear layer of the model is kept full precision by the recipe "
                             "(weights.keep_full_precision); nothing would be binarized.")
        self.ctx.note(f"BinarizeWeights: {len(self.swapped)} layers binarized, kept full precision by the recipe: "
                      f"{', '.join(sorted(self.kept)) or 'none'}")
        for name, why in self.refused.items():
            self.ctx.note(f"BinarizeWeights: kept '{name}' full precision: {why}.")
        if self.already_binary:
            self.ctx.note(f"BinarizeWeights: {len(self.already_binary)} subclassed layer(s) already compute 1-bit "
                          f"weights as the binary layer does (sign of the standardized weight), swapped for it "
                          f"({', '.join(self.already_binary[:4])}{', ...' if len(self.already_binary) > 4 else ''}).")
        subclassed = [n for n in self.swapped if _was_subclass(n, candidates) and n not in self.already_binary]
        if subclassed:
            self.ctx.note(f"BinarizeWeights: {len(subclassed)} subclassed layer(s) binarized after checking they "
                          f"compute as their parent class ({', '.join(subclassed[:4])}"
                          f"{', ...' if len(subclassed) > 4 else ''}).")
        use_channel_last_batchnorm(model)  # same numbers, no layout copies on [B, N, C] tokens (nn/fast_norm.py)
        return model

    def check(self, model: nn.Module) -> None:
        for name in self.swapped:
            m = model.get_submodule(name)
            if not is_binary_layer(m):
                raise PassError(f"BinarizeWeights: '{name}' is not binary after the swap.")
