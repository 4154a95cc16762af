"""Clones a traced graph does not need: `skip = x.clone()` before a block, `out + skip` after it.

Public code (SpikingResformer's blocks) copies the block input with `x.clone()` and adds the copy back at the end.
The copy has the values of x, so the add is the residual x + F(x); but in the graph its operand is a new node that
F does not read, and the residual trunk (trunk.py) does not see it. A clone only matters when something writes in
place afterwards; in a graph with no in-place write (no method or function ending in '_', no `inplace=True`
module or argument, no item assignment, no augmented operator) and no opaque leaf module (whose forward may write
into its inputs), each `clone()` is replaced by its input: the outputs and the gradients are the same.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}


def _writes_in_place(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.kwargs.get("inplace") is True:
        return True
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.startswith("_")
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        return n.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    if n.op == "call_module":
        return getattr(gm.get_submodule(n.target), "inplace", False) is True
    return False


def _is_plain_clone(n: fx.Node) -> bool:
    if len(n.args) != 1 or not isinstance(n.args[0], fx.Node):
        return False
    if set(n.kwargs) - {"memory_format"} or n.kwargs.get("memory_format", torch.preserve_format) not in (
            torch.preserve_format, None):
        return False
    return (n.op == "call_method" and n.target == "clone") or (n.op == "call_function" and n.target is torch.clone)


def drop_redundant_clones(gm: fx.GraphModule) -> int:
    """Replace every plain `clone()` of `gm` by its input when nothing in the graph writes in place; the count."""
    opaque = set(getattr(gm, "bc_trace_leaves", ()))
    nodes = list(gm.graph.nodes)
    if any(n.op == "call_module" and n.target in opaque for n in nodes):
        return 0
    if any(_writes_in_place(gm, n) for n in nodes):
        return 0
    dropped = 0
    for n in nodes:
        if _is_plain_clone(n):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            dropped += 1
    if dropped:
        gm.recompile()
    return dropped
