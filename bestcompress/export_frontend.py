"""torch.export(strict=False) as the second tracing front-end, for forwards torch.fx cannot trace.

fx traces with Proxies, so a forward that hands a value to Python (`math.sqrt(x.shape[-1])`, a loop over
`x.unbind(0)`, `isinstance(x, torch.Tensor)`, in-place slice assignment in a helper) fails or takes the wrong
branch. torch.export in non-strict mode runs the forward as Python on FakeTensors and records ATen ops, so it
captures such forwards whole. The passes need a graph of the fx kind, though: leaf modules (neurons, weight
layers, torch.nn built-ins — the fx tracer's leaves) as `call_module` nodes, and torch-level ops where the
passes look for them (`operator.add` for residuals, `torch.matmul` for attention).

How: during the export every leaf's forward is routed through one custom op (`bestcompress::leaf_call`) whose
fake kernel runs the real forward on FakeTensors, so the leaf stays one opaque node; the exported graph is then
rewritten (export_graph.py) into a plain fx.Graph over the original module tree: each leaf-call node becomes `call_module` with
the arguments it was given, parameters and buffers become `get_attr`, the ATen ops that the passes read are
mapped back to their torch-level forms (ATEN_TO_TORCH) and the rest stay ATen calls (they run eagerly as they
are). A module that export cannot capture either (a branch on a tensor value) becomes a leaf, one retry per
module, as in the fx front-end. The batch dimension is left dynamic (Dim.AUTO) where the model allows. A forward
that reads self.training is captured once per mode (`capture_module`) and the two graphs joined by
mode_branches.both_modes, as for fx: torch.export, like fx, records only the branch the model takes.

Used by bestcompress/trace.py (trace_model), which decides when to use it and reports it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .export_graph import ATEN_TO_TORCH, CaptureError, exported_to_fx_graph
from .snn_tracer import SNNTracer, _StateGuard

__all__ = ["ATEN_TO_TORCH", "CaptureError", "ExportCapture", "capture_module", "capture_with_export",
           "outputs_differ"]


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
        graph, constants, calls, dynamic = exported_to_fx_graph(ep, _CALLS, _LEAF_OP)
    finally:
        for key in [k for k in _CALLS if k.startswith(f"{session}:")]:
            del _CALLS[key]
    return ExportCapture(graph, constants, added, calls, dynamic)


def capture_module(model: nn.Module, example_args: tuple, make_gm):
    """(GraphModule over `model` made by `make_gm(model, root, graph)`, ExportCapture, None) of the capture in the
    model's current mode, its state restored after; (None, None, the CaptureError) when it fails."""
    guard = _StateGuard(model)
    try:
        cap = capture_with_export(model, example_args)
    except CaptureError as e:
        return None, None, e
    finally:
        guard.restore()
    for name, value in cap.constants.items():
        setattr(model, name, value)
    try:
        return make_gm(model, model, cap.graph), cap, None
    finally:
        for name in cap.constants:
            delattr(model, name)


def outputs_differ(model: nn.Module, gm: fx.GraphModule, example_args: tuple) -> str | None:
    """Why `gm` does not compute what `model` computes on the example (None when every output is equal)."""
    guard = _StateGuard(model)
    try:
        with torch.no_grad():
            want = model(*example_args)
            guard.restore()
            got = gm(*example_args)
    except Exception as e:  # noqa: BLE001 - any failure means the graph is not usable
        return f"it fails to run ({_short(e)})"
    finally:
        guard.restore()
    w, w_spec = pytree.tree_flatten(want)
    g, g_spec = pytree.tree_flatten(got)
    if w_spec != g_spec:
        return "its outputs are structured differently"
    for a, b in zip(w, g):
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b
        if not same:
            return "its outputs differ from the model's on the example input"
    return None
