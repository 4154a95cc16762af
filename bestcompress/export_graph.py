"""An exported program (torch.export, with bestcompress's leaf-call op) rewritten as a plain fx.Graph over the
original module tree, for the passes: each leaf call becomes `call_module` with the arguments it was given,
parameters and buffers `get_attr`, in-place writes on views indexed writes, and the ATen ops the passes read
their torch-level forms (ATEN_TO_TORCH); the other ATen ops stay ATen calls, which run eagerly as they are.

Used by bestcompress/export_frontend.py.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils import _pytree as pytree

__all__ = ["ATEN_TO_TORCH", "CaptureError", "exported_to_fx_graph"]

aten = torch.ops.aten


class CaptureError(Exception):
    """torch.export could not capture the forward, or its graph cannot be rewritten (the message says why)."""


# ---------------------------------------------------------------------------- ATen ops the passes read, mapped

def _no_kwargs(fn):
    return lambda args, kwargs: None if kwargs else (fn, args, {})


def functional_copy(self: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """aten.copy (the functional form of `self.copy_(src)`): `src` broadcast to `self`'s shape and dtype."""
    return src.to(self.dtype).expand_as(self).clone()


def slice_scatter(base: torch.Tensor, src: torch.Tensor, dim: int = 0, start=None, end=None, step: int = 1):
    """aten.slice_scatter as the indexed write a forward makes (`out[:, :, 1:] = src`), which ONNX exporters know."""
    out = base.clone()
    out[(slice(None),) * (dim % base.dim()) + (slice(start, end, step),)] = src
    return out


def select_scatter(base: torch.Tensor, src: torch.Tensor, dim: int, index: int):
    """aten.select_scatter as an indexed write (`out[:, 0] = src`)."""
    out = base.clone()
    out[(slice(None),) * (dim % base.dim()) + (index,)] = src
    return out


# ATen overload -> how to write it at the torch level (None: keep the ATen call). Only ops whose torch-level
# form computes the same for every argument the rule accepts; the passes recognise these forms.
ATEN_TO_TORCH = {
    aten.add.Tensor: _no_kwargs(operator.add),  # an `alpha` keeps the ATen form
    aten.sub.Tensor: _no_kwargs(operator.sub),
    aten.mul.Tensor: _no_kwargs(operator.mul),
    aten.div.Tensor: _no_kwargs(operator.truediv),  # a rounding_mode keeps the ATen form
    aten.add_.Tensor: _no_kwargs(operator.iadd),
    aten.matmul.default: _no_kwargs(torch.matmul),
    aten.bmm.default: _no_kwargs(torch.bmm),
    aten.transpose.int: _no_kwargs(torch.transpose),
    aten.softmax.int: lambda a, k: (torch.softmax, a[:2], {}) if len(a) == 2 and a[1:2] and not k else None,
    aten.dropout.default: _no_kwargs(torch.nn.functional.dropout),
    # the TorchScript ONNX exporter has no aten::copy, slice_scatter, select_scatter
    aten.copy.default: _no_kwargs(functional_copy),
    aten.slice_scatter.default: _no_kwargs(slice_scatter),
    aten.select_scatter.default: _no_kwargs(select_scatter),
    aten._unsafe_view.default: _no_kwargs(torch.reshape),
}


def _torch_level(target, args, kwargs):
    rule = ATEN_TO_TORCH.get(target)
    mapped = rule(tuple(args), dict(kwargs)) if rule is not None else None
    return mapped if mapped is not None else (target, tuple(args), dict(kwargs))


# ------------------------------------------------------------------------------ exported program -> fx.Graph

def _module_stack(node: fx.Node, drop_last: bool) -> dict:
    stack = [(p, t) for p, t in (node.meta.get("nn_module_stack") or {}).values() if p]
    if drop_last and stack:
        stack = stack[:-1]
    return {p: (p, t) for p, t in stack}


def _output_paths(spec: pytree.TreeSpec) -> list[tuple]:
    """The index path of every leaf of a (tuple/list/dict/namedtuple) output spec, in flatten order."""
    if spec.is_leaf():
        return [()]
    children = [spec.child(i) for i in range(spec.num_children)]
    keys = spec.context if spec.type is dict else range(len(children))
    return [(k,) + rest for k, child in zip(keys, children) for rest in _output_paths(child)]


_VIEW_OPS = {aten.slice.Tensor, aten.select.int}


def _indexed_write(node: fx.Node, env: dict):
    """`aten.copy_(view, src)` with `view` a chain of slice/select ops of a tensor, as `operator.setitem(base,
    index, src)`: the TorchScript ONNX exporter loses an ATen copy_ called on a view (the graph then ignores its
    input), but records the indexed write a forward makes (`out[:, :, 1:] = src`). None when not of that form."""
    chain, view = [], node.args[0]
    while isinstance(view, fx.Node) and view.op == "call_function" and view.target in _VIEW_OPS:
        chain.insert(0, view)
        view = view.args[0]
    val = view.meta.get("val") if isinstance(view, fx.Node) else None
    if not chain or node.kwargs or not isinstance(val, torch.Tensor):
        return None
    index: list = [slice(None)] * val.dim()
    dims = list(range(val.dim()))  # the base dimension behind each dimension of the current view
    for op in chain:
        dim = op.args[1] if len(op.args) > 1 else 0
        if not isinstance(dim, int) or not dims or index[dims[dim]] != slice(None):
            return None
        base_dim = dims[dim]
        if op.target is aten.select.int:
            index[base_dim] = op.args[2]
            del dims[dim]
        else:
            start, end, step = (list(op.args[2:]) + [None, None, 1])[:3]
            index[base_dim] = slice(start, end, step)
    if any(not isinstance(i, (int, slice)) for i in index) or any(
            not isinstance(b, (int, type(None))) for i in index if isinstance(i, slice)
            for b in (i.start, i.stop, i.step)):
        return None  # a symbolic bound
    return operator.setitem, (env[view], tuple(index), env[node.args[1]] if isinstance(node.args[1], fx.Node)
                              else node.args[1])


def exported_to_fx_graph(ep, leaf_calls: dict, leaf_op):
    """(graph, constants, number of leaf calls, whether the batch stayed free) of exported program `ep`, whose
    `leaf_op` nodes name their calls in `leaf_calls` (qualname, rebuild, out_spec, out_leaves)."""
    from torch.export.graph_signature import InputKind, OutputKind
    sig = ep.graph_signature
    by_name = {s.arg.name: s for s in sig.input_specs}
    g = fx.Graph()
    env: dict[fx.Node, object] = {}
    constants: dict[str, torch.Tensor] = {}
    leaf_outputs: dict[fx.Node, tuple[fx.Node, object]] = {}
    calls, dynamic = 0, False

    def arg(a):
        return fx.node.map_arg(a, lambda n: env[n])

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = by_name[node.name]
            if spec.kind == InputKind.USER_INPUT:
                env[node] = g.placeholder(node.name)
                val = node.meta.get("val")
                dynamic |= isinstance(val, torch.Tensor) and val.dim() > 0 and not isinstance(val.shape[0], int)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                env[node] = g.get_attr(spec.target)
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                name = f"_bc_export_constant{len(constants)}"
                constants[name] = ep.constants[spec.target]
                env[node] = g.get_attr(name)
            else:
                raise CaptureError(f"the exported program has an input of kind {spec.kind.name}")
        elif node.op == "call_function" and node.target is leaf_op:
            call = leaf_calls[node.args[0]]
            args, kwargs = call.rebuild([env[a] for a in node.args[1]])
            new = g.call_module(call.qualname, tuple(args), dict(kwargs))
            new.meta["nn_module_stack"] = _module_stack(node, drop_last=True)
            leaf_outputs[node] = (new, call)
            env[node] = new
            calls += 1
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in leaf_outputs:
            new, call = leaf_outputs[node.args[0]]
            tensor_paths = [p for p, (_, t) in zip(_output_paths(call.out_spec), call.out_leaves) if t]
            out = new
            for k in tensor_paths[node.args[1]]:
                out = g.call_function(operator.getitem, (out, k))
            env[node] = out
        elif node.op == "call_function":
            write = _indexed_write(node, env) if node.target is aten.copy_.default else None
            target, args, kwargs = (*write, {}) if write else _torch_level(node.target, arg(node.args),
                                                                           arg(node.kwargs))
            new = g.call_function(target, args, kwargs)
            new.meta["nn_module_stack"] = _module_stack(node, drop_last=False)
            if "stack_trace" in node.meta:
                new.meta["stack_trace"] = node.meta["stack_trace"]
            env[node] = new
        elif node.op == "output":
            flat = list(node.args[0])
            user = []
            for value, spec in zip(flat, sig.output_specs):
                if spec.kind == OutputKind.USER_OUTPUT:
                    user.append(arg(value))
                elif spec.kind == OutputKind.BUFFER_MUTATION:  # state the forward writes outside a leaf
                    g.call_function(aten.copy_.default, (g.get_attr(spec.target), arg(value)))
                else:
                    raise CaptureError(f"the exported program has an output of kind {spec.kind.name}")
            out_spec = ep.call_spec.out_spec
            g.output(pytree.tree_unflatten(user, out_spec) if out_spec is not None else tuple(user))
        else:
            raise CaptureError(f"the exported graph has a '{node.op}' node ({node.target}) fx cannot rewrite")
    for n in reversed(list(g.nodes)):  # parameters read only inside leaves, views only the writes read
        if not n.users and (n.op == "get_attr" or (n.op == "call_function" and n.target in _VIEW_OPS)):
            g.erase_node(n)
    g.lint()
    return g, constants, calls, dynamic
