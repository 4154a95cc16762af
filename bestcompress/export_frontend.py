"""torch.export(strict=False) as the second tracing front-end, for forwards torch.fx cannot trace.

fx traces with Proxies, so a forward that hands a value to Python (`math.sqrt(x.shape[-1])`, a loop over
`x.unbind(0)`, `isinstance(x, torch.Tensor)`, in-place slice assignment in a helper) fails or takes the wrong
branch. torch.export in non-strict mode runs the forward as Python on FakeTensors and records ATen ops, so it
captures such forwards whole. The passes need a graph of the fx kind, though: leaf modules (neurons, weight
layers, torch.nn built-ins — the fx tracer's leaves) as `call_module` nodes, and torch-level ops where the
passes look for them (`operator.add` for residuals, `torch.matmul` for attention).

How: during the export every leaf's forward is routed through one custom op (`bestcompress::leaf_call`) whose
fake kernel runs the real forward on FakeTensors, so the leaf stays one opaque node; the exported graph is then
rewritten into a plain fx.Graph over the original module tree: each leaf-call node becomes `call_module` with
the arguments it was given, parameters and buffers become `get_attr`, the ATen ops that the passes read are
mapped back to their torch-level forms (ATEN_TO_TORCH) and the rest stay ATen calls (they run eagerly as they
are). A module that export cannot capture either (a branch on a tensor value) becomes a leaf, one retry per
module, as in the fx front-end. The batch dimension is left dynamic (Dim.AUTO) where the model allows.

Used by bestcompress/trace.py (trace_model), which decides when to use it and reports it.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .snn_tracer import SNNTracer

__all__ = ["ATEN_TO_TORCH", "CaptureError", "ExportCapture", "capture_with_export"]

aten = torch.ops.aten


class CaptureError(Exception):
    """torch.export could not capture the forward (the message says where and why)."""


# ----------------------------------------------------------------------------------- leaves as one custom op

@dataclass
class _LeafCall:
    qualname: str
    forward: object  # the module's own forward (the instance's `forward` is patched during the export)
    in_spec: pytree.TreeSpec
    in_leaves: list  # non-tensor leaves of (args, kwargs) as given; tensors are None here
    out_spec: pytree.TreeSpec | None = None
    out_leaves: list = field(default_factory=list)  # non-tensor output leaves; tensors are None here
    recorded: object = None  # what the call returned in an eager run on the example (opaque leaves only)
    recorded_sizes: list = field(default_factory=list)  # the shape of that call's first tensor input

    def rebuild(self, tensors: list):
        it = iter(tensors)
        leaves = [next(it) if is_tensor else v for v, is_tensor in self.in_leaves]
        return pytree.tree_unflatten(leaves, self.in_spec)


_CALLS: dict[str, _LeafCall] = {}
_session = itertools.count()


def _like(recorded, sizes, example_sizes):
    """A new tensor shaped as an eagerly recorded output; a dimension equal to one of the call's first input's
    dimensions in that run takes this call's size of it (a free batch size stays free)."""
    if not isinstance(recorded, torch.Tensor):
        return recorded
    shape = [sizes[example_sizes.index(d)] if d in example_sizes else d for d in recorded.shape]
    return torch.empty(shape, dtype=recorded.dtype, device=recorded.device)


def _run_leaf(key: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    call = _CALLS[key]
    args, kwargs = call.rebuild(list(tensors))
    if call.recorded is None:
        out = call.forward(*args, **kwargs)
    else:  # a module made opaque (its forward may branch on values, which FakeTensors cannot): shapes as recorded
        sizes = list(tensors[0].shape) if tensors else []
        out = pytree.tree_map(lambda v: _like(v, sizes, call.recorded_sizes), call.recorded)
    flat, spec = pytree.tree_flatten(out)
    call.out_spec = spec
    call.out_leaves = [(None, True) if isinstance(v, torch.Tensor) else (v, False) for v in flat]
    return [v.clone() for v in flat if isinstance(v, torch.Tensor)]  # a custom op may not return an alias


@torch.library.custom_op("bestcompress::leaf_call", mutates_args=())
def _leaf_call(key: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return _run_leaf(key, tensors)


@_leaf_call.register_fake
def _leaf_call_fake(key, tensors):
    return _run_leaf(key, tensors)


_LEAF_OP = torch.ops.bestcompress.leaf_call.default


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


# -------------------------------------------------------------------------------------------------- capture

@dataclass
class ExportCapture:
    """The result of capture_with_export: an fx.Graph over `model`'s module tree and what it took."""

    graph: fx.Graph
    constants: dict[str, torch.Tensor]  # tensors the forward made (get_attr targets to install on the root)
    leaves_added: list[tuple[str, str]]  # modules export could not capture either: (qualname, reason)
    leaf_calls: int  # call_module nodes
    dynamic_batch: bool  # the first dimension of the inputs stayed free


def _leaf_names(model: nn.Module, extra: set[str]) -> dict[str, nn.Module]:
    """The fx front-end's leaves (outermost only): neurons, weight layers, torch.nn built-ins, `extra`."""
    rule = SNNTracer(extra)
    found: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if rule.is_leaf_module(child, path) and not isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                found[path] = child
            else:
                walk(child, path)
    walk(model, "")
    return found


def _record_eager(model: nn.Module, args: tuple, names: set[str]) -> dict[str, list]:
    """Per module in `names`, the (first input's shape, output) of each call in one eager forward on `args`."""
    from .snn_tracer import _StateGuard
    found: dict[str, list] = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(mod, a, out, _n=n):
            first = next((t for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor)), None)
            found[_n].append((list(first.shape) if first is not None else [],
                              pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)))
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    guard = _StateGuard(model)
    try:
        with torch.no_grad():
            model(*args)
    finally:
        guard.restore()
        for h in handles:
            h.remove()
    return found


def _patch_leaves(leaves: dict[str, nn.Module], session: int, recorded: dict[str, list]) -> list:
    undo = []
    for path, module in leaves.items():
        counter = itertools.count()

        def wrapper(*args, _path=path, _forward=module.forward, _counter=counter, **kwargs):
            k = next(_counter)
            key = f"{session}:{_path}@{k}"
            flat, spec = pytree.tree_flatten((args, kwargs))
            _CALLS[key] = call = _LeafCall(_path, _forward, spec, [
                (None, True) if isinstance(v, torch.Tensor) else (v, False) for v in flat])
            seen = recorded.get(_path)
            if seen:
                call.recorded_sizes, call.recorded = seen[k % len(seen)]
            out = _leaf_call(key, [v for v in flat if isinstance(v, torch.Tensor)])
            it = iter(out)
            return pytree.tree_unflatten([next(it) if t else v for v, t in call.out_leaves], call.out_spec)
        undo.append((module, module.__dict__.get("forward")))
        module.__dict__["forward"] = wrapper
    return undo


def _track_calls(model: nn.Module, leaves: dict[str, nn.Module]) -> tuple[list[str], list]:
    """Hooks keeping the stack of module calls that have not returned (the innermost failed, on an error)."""
    stack: list[str] = []
    handles = []

    def _pop(module, args, out) -> None:  # a forward hook that returned a value would replace the output
        if stack:
            stack.pop()
    for path, m in model.named_modules():
        if path in leaves or any(path.startswith(p + ".") for p in leaves):
            continue
        handles.append(m.register_forward_pre_hook(lambda mod, args, _p=path: stack.append(_p)))
        handles.append(m.register_forward_hook(_pop))
    return stack, handles


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200]


def _export_once(model: nn.Module, args: tuple, extra: set[str]):
    leaves = _leaf_names(model, extra)
    session = next(_session)
    try:  # what the modules made opaque return, for when their forward cannot run on FakeTensors
        recorded = _record_eager(model, args, {n for n in extra if n in leaves}) if extra else {}
    except Exception as e:  # noqa: BLE001 - the model does not run on its example: nothing to capture
        return None, leaves, session, e, None
    undo = _patch_leaves(leaves, session, recorded)
    stack, handles = _track_calls(model, leaves)
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None
                    for a in args)
    try:
        ep = torch.export.export(model, args, strict=False, dynamic_shapes=dynamic)
        return ep, leaves, session, None, None
    except Exception as e:  # noqa: BLE001 - any failure: the caller retries with a leaf or gives up
        return None, leaves, session, e, (stack[-1] if stack else None)
    finally:
        for h in handles:
            h.remove()
        for module, forward in undo:
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward


def capture_with_export(model: nn.Module, example_args: tuple, extra_leaves: set[str] | None = None) -> ExportCapture:
    """Capture `model`'s forward on `example_args` with torch.export(strict=False) as an fx.Graph (see the module
    docstring); modules export fails in become leaves, one retry each. Raises CaptureError."""
    extra = set(extra_leaves or ())
    added: list[tuple[str, str]] = []
    for _ in range(len(list(model.modules())) + 1):
        ep, leaves, session, err, failed = _export_once(model, example_args, extra)
        if ep is not None:
            break
        if not failed or failed in extra:  # the root itself, or a leaf's own forward
            raise CaptureError(f"torch.export could not capture '{failed or '<root>'}' ({_short(err)})") from err
        extra.add(failed)
        added.append((failed, _short(err)))
    else:  # pragma: no cover - bounded by the module count
        raise CaptureError("torch.export kept failing")
    try:
        graph, constants, calls, dynamic = _to_fx_graph(ep, session)
    finally:
        for key in [k for k in _CALLS if k.startswith(f"{session}:")]:
            del _CALLS[key]
    return ExportCapture(graph, constants, added, calls, dynamic)


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


def _to_fx_graph(ep, session: int):
    from torch.export.graph_signature import InputKind, OutputKind
    sig = ep.graph_signature
    by_name = {s.arg.name: s for s in sig.input_specs}
    g = fx.Graph()
    env: dict[fx.Node, object] = {}
    constants: dict[str, torch.Tensor] = {}
    leaf_outputs: dict[fx.Node, tuple[fx.Node, _LeafCall]] = {}
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
        elif node.op == "call_function" and node.target is _LEAF_OP:
            call = _CALLS[node.args[0]]
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
