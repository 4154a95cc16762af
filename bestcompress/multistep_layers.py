"""Multi-step convolutions: Conv subclasses that take [T, B, C, ...] and convolve each time step as their parent.

SNN libraries wrap convolutions for a time axis (spikingjelly's `layer.Conv2d(..., step_mode='m')`, which public
code such as SpikingResformer subclasses): the layer refuses a plain [B, C, H, W] batch and computes
parent(x.flatten(0, 1)) reshaped back to [T, B, ...]. In a traced graph such a layer is rewritten to what it
computes: flatten(0, 1), the plain parent layer (same name, same weight and bias), reshape to [T, B, ...]. The
rewrite is made only after checking on seeded random input that the layer computes exactly that, so the weight
swaps then see a plain Conv and binarize it. A subclass that takes the plain batch is left to the subclass check
of BinarizeWeights; one that computes something else on [T, B, ...] is left as it is.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .plain_layers import plain_layer, random_input

_CONVS = (nn.Conv1d, nn.Conv2d)


def _plain(module: nn.Module, parent: type) -> nn.Module:
    plain = plain_layer(module, parent)
    plain.weight, plain.bias = module.weight, module.bias  # the same parameters (names and state_dict keys)
    return plain


def _multistep(module: nn.Module, parent: type, seed: int = 0) -> nn.Module | None:
    """The plain parent layer when `module` refuses a plain batch but convolves each step of [T, B, ...] as the
    parent does (checked on seeded random input), else None."""
    g = torch.Generator().manual_seed(seed)
    x = random_input(module, parent, g)
    try:
        with torch.no_grad():
            module(x)
        return None  # takes a plain batch: not a multi-step layer
    except Exception:  # noqa: BLE001 - refusing the plain batch is what a multi-step layer does
        pass
    xs = random_input(module, parent, g, lead=(3, 2))
    plain = _plain(module, parent)
    try:
        with torch.no_grad():
            got = module(xs)
            expected = plain(xs.flatten(0, 1))
    except Exception:  # noqa: BLE001 - it takes neither form: leave it to the subclass check
        return None
    expected = expected.reshape(xs.shape[:2] + expected.shape[1:])
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5,
                                                                                          atol=1e-6):
        return plain
    return None


def fold_multistep_convs(gm: fx.GraphModule) -> list[str]:
    """Rewrite each multi-step Conv call of `gm` to flatten(0, 1) -> the plain parent -> reshape; the names."""
    calls: dict[str, list[fx.Node]] = {}  # a module may be called more than once (both modes of a ModeSwitch)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    plains: dict[str, tuple[nn.Module, type]] = {}
    for target, nodes in calls.items():
        module = gm.get_submodule(target)
        parent = next((c for c in type(module).__mro__ if c in _CONVS), None)
        if parent is None or type(module) is parent or any(len(n.args) != 1 or n.kwargs for n in nodes):
            continue
        plain = _multistep(module, parent)
        if plain is not None:
            plains[target] = (plain, parent)
    for target, (plain, parent) in plains.items():
        owner, _, attr = target.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, attr, plain)
    done = list(plains)
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target in plains]:
        parent = plains[node.target][1]
        (x,) = node.args
        g = gm.graph
        with g.inserting_before(node):
            t, b = g.call_method("size", (x, 0)), g.call_method("size", (x, 1))
            flat = g.call_method("flatten", (x, 0, 1))
        node.args = (flat,)
        rest, prev = [], node
        for i in range(1, 3 if parent is nn.Conv1d else 4):  # the output's C and spatial sizes, in order
            with g.inserting_after(prev):
                prev = g.call_method("size", (node, i))
            rest.append(prev)
        with g.inserting_after(prev):
            out = g.call_method("reshape", (node, t, b, *rest))
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out and u not in rest)
    if done:
        gm.recompile()
    return done
