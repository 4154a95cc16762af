"""Compile a binary model into the engine's form: packed layers in place of the binary ones, popcount matmuls.

The model keeps its own graph (a torch.fx GraphModule, or an eager root with traced children): every binary
Conv1d/Conv2d/Linear module becomes a PackedLinear/PackedConv holding only sign bits, and every matmul node of
every graph becomes `popcount_matmul`. Neurons, normalizations, the full-precision first layer and heads, pooling
and couplings stay the model's own torch ops, so spikes are computed by the same code as in PyTorch.
BatchNorm is not folded into the popcount outputs: folding changes float rounding, and that is not exact.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..nn.binary import BinaryLinear, is_binary_layer
from .layers import PackedConv, PackedLinear, popcount_matmul

_MATMULS = (operator.matmul, torch.matmul)


@dataclass
class Plan:
    """What compile_model did: packed layers, layers kept in PyTorch (with why), rewritten matmuls."""

    packed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    matmuls: int = 0


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _rewrite_matmuls(gm: fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _MATMULS:
            node.target = popcount_matmul
            count += 1
        elif node.op == "call_method" and node.target == "matmul":
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(popcount_matmul, tuple(node.args), dict(node.kwargs))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
    if count:
        gm.recompile()
    return count


def compile_model(model: nn.Module, copy_model: bool = True) -> tuple[nn.Module, Plan]:
    """The engine form of a binary model (eval mode, no gradients needed).

    Args:
        model: a binary model (from binarize, bc.load or load_packed).
        copy_model: work on a deep copy (the caller's model is left as it is).
    Returns:
        (engine model, plan).
    """
    if copy_model:
        model = copy.deepcopy(model)
    model.eval()
    plan = Plan()
    for name, layer in list(model.named_modules()):
        if not is_binary_layer(layer):
            continue
        try:
            new = PackedLinear(layer) if isinstance(layer, BinaryLinear) else PackedConv(layer)
        except ValueError as e:
            plan.kept[name] = str(e)
            continue
        _set_module(model, name, new)
        plan.packed.append(name)
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        plan.matmuls += _rewrite_matmuls(gm)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, plan
