"""Shape propagation over every traced graph of a (possibly partly eager) model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..trace import graph_modules


@dataclass
class CallRecord:
    """What one forward of a model showed about some of its modules."""

    args: dict[str, tuple] = field(default_factory=dict)  # positional arguments of each module's first call
    counts: dict[str, int] = field(default_factory=dict)  # how many times each module ran
    order: list[str] = field(default_factory=list)  # modules in the order of their first call


def record_calls(model: nn.Module, modules: dict[str, nn.Module], example_input) -> CallRecord:
    """Run `model` once on `example_input` with pre-hooks on `modules` (removed afterwards)."""
    rec = CallRecord(counts={name: 0 for name in modules})

    def hook(name):
        def fn(mod, args):
            if name not in rec.args:
                rec.args[name] = args
                rec.order.append(name)
            rec.counts[name] += 1
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return rec


def capture_inputs(model: nn.Module, modules: dict[str, nn.Module], example_input) -> dict[str, tuple]:
    """The positional arguments of the first call of each module in `modules` during one forward."""
    return record_calls(model, modules, example_input).args


def free_module_name(root: nn.Module, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first qualified name no submodule of `root` has yet."""
    names = {n for n, _ in root.named_modules()}
    if base not in names:
        return base
    i = 1
    while f"{base}_{i}" in names:
        i += 1
    return f"{base}_{i}"


def propagate_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Fill `node.meta['tensor_meta']` in every GraphModule of `model` from one forward on `example_input`.

    Returns:
        How many times each GraphModule ran in that forward (T times for a block a model calls per time step).
    """
    gms = dict(graph_modules(model))
    rec = record_calls(model, gms, example_input)
    for name, gm in gms.items():
        if name in rec.args:
            with torch.no_grad():
                ShapeProp(gm).propagate(*rec.args[name])
    return rec.counts


def node_shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
