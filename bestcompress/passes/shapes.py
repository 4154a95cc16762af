"""Shape propagation over every traced graph of a (possibly partly eager) model."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..trace import graph_modules


def capture_inputs(model: nn.Module, modules: dict[str, nn.Module], example_input) -> dict[str, tuple]:
    """Run `model` once and record the positional arguments of the first call of each module in `modules`."""
    seen: dict[str, tuple] = {}

    def hook(name):
        def fn(mod, args):
            seen.setdefault(name, args)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def propagate_shapes(model: nn.Module, example_input: torch.Tensor) -> None:
    """Fill `node.meta['tensor_meta']` in every GraphModule of `model` from one forward on `example_input`."""
    gms = dict(graph_modules(model))
    inputs = capture_inputs(model, gms, example_input)
    for name, gm in gms.items():
        if name in inputs:
            with torch.no_grad():
                ShapeProp(gm).propagate(*inputs[name])


def node_shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
