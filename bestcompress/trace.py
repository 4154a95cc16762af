"""SNN-aware tracing: neurons are leaves, failing modules become leaves, an untraceable root is recursed into.

With an example input the tracer (bestcompress/snn_tracer.py) knows concrete shapes, so Python branches on
shapes (`len(x.shape) < 5`, `x.ndim`, `range(x.shape[0])`, `for x_t in x`) are taken as the example input takes
them: specialised, and each specialisation is reported. A neuron's stored state read by the forward (snnTorch
`mem = lif.init_leaky()`) becomes a constant of the graph, never a live read of the membrane the previous call
left. A forward unrolled over time steps is marked (annotate_time_steps). Every fallback is written to the
TraceReport: nothing is handled silently.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .mode_branches import both_modes
from .snn_tracer import _CALL, _SHAPE, _VALUE, SNNTracer, _StateGuard, is_neuron, neuron_classes

__all__ = ["SNNTracer", "TraceReport", "annotate_time_steps", "graph_modules", "is_neuron", "neuron_classes",
           "trace_model"]


@dataclass
class TraceReport:
    """What the tracer could not trace and how it handled it."""

    leaves_added: list[tuple[str, str]] = field(default_factory=list)  # (qualname, reason)
    eager: list[tuple[str, str]] = field(default_factory=list)  # modules kept eager, children traced
    concrete_args: dict[str, object] = field(default_factory=dict)
    specialised: list[str] = field(default_factory=list)  # shape branches taken as the example input takes them
    state_constants: list[str] = field(default_factory=list)  # neuron state read at trace time, now constant
    front_ends: list[str] = field(default_factory=list)  # where torch.export was used or tried (export_frontend)
    mode_branches: list[str] = field(default_factory=list)  # forwards branching on self.training (mode_branches)

    def lines(self) -> list[str]:
        out = []
        twins: dict[str, list[str]] = {}  # modules made leaves with the one of their class that failed
        for name, why in self.leaves_added:
            if why.startswith("as '"):
                twins.setdefault(why, []).append(name)
            else:
                out.append(f"'{name or '<root>'}' kept as an opaque leaf (tracing it failed: {why})")
        for why, names in twins.items():
            shown = ", ".join(f"'{n}'" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            out.append(f"{shown} kept as opaque leaves too ({why})")
        for name, why in self.eager:
            out.append(f"'{name or '<root>'}' runs eagerly; its children were traced instead ({why})")
        for name, value in self.concrete_args.items():
            out.append(f"forward argument '{name}' fixed to {value!r} for tracing")
        for what in self.specialised:
            out.append(f"specialised on the example input's shapes: {what}")
        out.extend(self.front_ends)
        out.extend(self.mode_branches)
        if self.state_constants:
            names = ", ".join(self.state_constants[:6]) + (", ..." if len(self.state_constants) > 6 else "")
            out.append(f"neuron state read by the forward ({len(self.state_constants)}: {names}) is the fresh state "
                       "it was at trace time on every call, not the membrane the previous call left")
        return out

    @property
    def clean(self) -> bool:
        return not self.leaves_added and not self.eager


def _none_default_args(module: nn.Module) -> dict[str, object]:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return {}
    return {name: None for name, p in sig.parameters.items()
            if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _rename_placeholders(gm: fx.GraphModule, model: nn.Module) -> None:
    # fx renames the placeholder of a concrete arg (`hook` -> `hook_1`), so `gm(x, hook=None)` would fail:
    # give every placeholder its forward-argument name back.
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return
    taken = {n.name for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op != "placeholder" or str(node.target).startswith("*"):
            continue
        base, sep, suffix = str(node.target).rpartition("_")
        if not (sep and suffix.isdigit() and base in params and node.target not in params):
            continue
        if base in taken and node.name != base:
            continue
        node.target = base
        node.name = base
        taken.add(base)
        namespace = getattr(gm.graph, "_graph_namespace", None)
        if namespace is not None and hasattr(namespace, "_used_names"):
            namespace._used_names.add(base)  # nodes added later must not take the name
    gm.recompile()


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200]


_GRAPH_MODULE_NAMES = set(dir(fx.GraphModule))
_traced_classes: dict[type, type] = {}


def _plain_attrs(module: nn.Module) -> dict[str, object]:
    """Public non-module, non-tensor instance attributes (heads, T, bc_spec, bc_recipe, ...)."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and not isinstance(v, (nn.Module, torch.Tensor))}


def _keep_attrs_deepcopy(self, memo):
    # GraphModule's deepcopy rebuilds from the graph and drops plain attributes; copy them over.
    res = fx.GraphModule.__deepcopy__(self, memo)
    type(res).__name__ = type(self).__name__  # GraphModule.__init__ renamed the per-instance class
    for k, v in _plain_attrs(self).items():
        if k not in res.__dict__:
            res.__dict__[k] = copy.deepcopy(v, memo)
    return res


def _traced_class(source: type) -> type:
    """A GraphModule class that also carries `source`'s own methods and class attributes (not forward).

    An eager parent keeps calling helpers of its traced children (e.g. `blk.init_mems()`), and user code calls
    helpers of the root; a plain GraphModule has lost them. GraphModule's per-instance subclassing keeps
    this class through deepcopy.
    """
    if source not in _traced_classes:
        ns: dict[str, object] = {}
        for klass in reversed(source.__mro__):
            if klass in (object, nn.Module) or issubclass(fx.GraphModule, klass):
                continue
            for name, value in vars(klass).items():
                if (name.startswith("__") and name.endswith("__")) or name == "forward" or name in _GRAPH_MODULE_NAMES:
                    continue
                ns[name] = value
        ns["__deepcopy__"] = _keep_attrs_deepcopy
        ns["bc_source_class"] = source
        ns["__module__"] = source.__module__
        _traced_classes[source] = type(source.__name__, (fx.GraphModule,), ns)
    return _traced_classes[source]


def _make_graph_module(model: nn.Module, root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    gm = _traced_class(type(model))(root, graph, model.__class__.__name__)
    for k, v in _plain_attrs(model).items():  # attributes the copied methods and user code may read
        if k not in gm.__dict__:
            gm.__dict__[k] = v
    return gm


def _trace_once(model: nn.Module, leaves: set[str], concrete: dict[str, object], example_args: tuple | None):
    tracer = SNNTracer(leaves, example_args)
    guard = _StateGuard(model) if example_args is not None else None
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # record which module failed; the caller decides the fallback
        return None, tracer, e
    finally:
        if guard is not None:
            guard.restore()
    for node in graph.nodes:  # the example's values were for tracing only
        for key in (_VALUE, _CALL, _SHAPE):
            node.meta.pop(key, None)
    gm = _make_graph_module(model, tracer.root, graph)
    return gm, tracer, None


def annotate_time_steps(gm: fx.GraphModule, time_steps: int | None = None) -> int | None:
    """Mark the per-step copies of a forward unrolled over time steps; returns the number of steps or None.

    A loop over time, unrolled by the trace, calls the same modules once per step. When the weight-free and
    weight layers that are called more than once are all called the same number of times n (or T, when the
    model declares T), every node gets `node.meta['bc_time_step']` (the step it belongs to; nodes before the
    loop or after it, which read every step, get none) and the GraphModule gets `bc_time_steps = n`.
    """
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    repeated = {c for c in counts.values() if c > 1}
    steps = time_steps if time_steps in repeated else (repeated.pop() if len(repeated) == 1 else None)
    if not steps:
        return None
    seen: dict[str, int] = {}
    reads: dict[fx.Node, frozenset] = {}  # the steps whose values each node depends on
    for n in gm.graph.nodes:
        if n.op == "call_module" and counts[n.target] == steps:
            k = seen.get(n.target, 0)
            seen[n.target] = k + 1
            n.meta["bc_step_module"] = n.target
            reads[n] = frozenset((k,))
        else:
            reads[n] = frozenset().union(*(reads.get(a, frozenset()) for a in n.all_input_nodes))
        if len(reads[n]) == 1:
            n.meta["bc_time_step"] = next(iter(reads[n]))
        else:
            n.meta.pop("bc_time_step", None)
    gm.bc_time_steps = steps
    return steps


def trace_model(model: nn.Module, report: TraceReport | None = None, prefix: str = "", example_input=None,
                time_steps: int | None = None, child_inputs: dict[str, tuple] | None = None):
    """Trace `model` into a GraphModule, falling back module by module where tracing fails.

    Args:
        model: any nn.Module (a spiking transformer).
        report: collects what could not be traced; a new one is made if None.
        prefix: qualified name of `model` inside the root (for messages).
        example_input: a batch (or a tuple of positional inputs) the model accepts; with it, shape branches are
            specialised to its shapes and the children of an eager root are traced with their own inputs.
        time_steps: the model's T, used to recognise a forward unrolled over time (see annotate_time_steps).
        child_inputs: (internal) the inputs of the children of an eager container, by child name.
    Returns:
        (traced, report): a GraphModule, or — when the root forward itself cannot be traced — the root module
        with each child replaced by its own traced form.
    """
    report = report if report is not None else TraceReport()
    if isinstance(model, fx.GraphModule):
        return model, report
    example_args = None if example_input is None else (
        tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,))
    concrete = _none_default_args(model)
    leaves: set[str] = set()
    fx_added: list[tuple[str, str]] = []
    err: Exception | None = None
    # Each failed attempt turns one more module into a leaf, so the number of modules bounds the attempts.
    for _ in range(len(list(model.modules())) + 1):
        gm, tracer, err = _trace_once(model, leaves, concrete, example_args)
        if gm is not None:
            gm = both_modes(model, gm, lambda m, n: n in leaves or tracer.is_leaf_module(m, n),
                            lambda: _trace_once(model, leaves, concrete, example_args), report.mode_branches, prefix)
            if concrete:
                _rename_placeholders(gm, model)
                for k, v in concrete.items():
                    report.concrete_args[f"{prefix}.{k}" if prefix else k] = v
            where = f"'{prefix}': " if prefix else ""
            report.specialised.extend(where + s for s in dict.fromkeys(tracer.specialised))
            report.state_constants.extend(f"{prefix}.{s}" if prefix else s for s in dict.fromkeys(tracer.state_constants))
            gm.bc_trace_leaves = sorted(leaves)
            opaque = [n for n in leaves if holds_rewritable(model.get_submodule(n))]
            if opaque and example_args is not None:  # torch.export may capture what fx made opaque
                kept, report.leaves_added = report.leaves_added, [x for x in report.leaves_added if x not in fx_added]
                better = _export_front_end(model, example_args, report, prefix, time_steps, fx_leaves=len(opaque))
                if better is not None:
                    return better, report
                report.leaves_added = kept
            annotate_time_steps(gm, time_steps)
            return gm, report
        failed = tracer.failed_module
        if failed and failed not in leaves:
            name = f"{prefix}.{failed}" if prefix else failed
            for other in [failed] + _harmless_twins(model, failed, leaves):
                leaves.add(other)
                why = _short(err) if other == failed else f"as '{name}', of the same class, whose tracing failed"
                fx_added.append((f"{prefix}.{other}" if prefix else other, why))
                report.leaves_added.append(fx_added[-1])
            continue
        break
    if example_args is not None:  # the root forward defeats fx: the second front-end, before going eager
        kept, report.leaves_added = report.leaves_added, [x for x in report.leaves_added if x not in fx_added]
        captured = _export_front_end(model, example_args, report, prefix, time_steps, fx_error=_short(err))
        if captured is not None:
            return captured, report
        report.leaves_added = kept
    # The root's own forward cannot be traced: keep it eager and trace its children.
    report.eager.append((prefix, _short(err)))
    leaf_check = SNNTracer()
    children = {}
    for name, child in list(model.named_children()):
        if len(list(child.parameters())) == 0 and not list(child.children()):
            continue
        # Leaves stay the modules they are: tracing an nn.Conv2d would turn it into a GraphModule calling
        # F.conv2d, which weight swaps and call-order hooks no longer recognise. Containers are recursed into.
        if leaf_check.is_leaf_module(child, name) and not isinstance(child, (nn.ModuleList, nn.ModuleDict,
                                                                               nn.Sequential)):
            continue
        children[name] = child
    if child_inputs is None:
        child_inputs = _first_inputs(model, children, example_args) if example_args is not None else {}
    for name, child in children.items():
        child_prefix = f"{prefix}.{name}" if prefix else name
        inner = None
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # never called itself: pass its elements' inputs
            inner = {k[len(name) + 1:]: v for k, v in child_inputs.items() if k.startswith(name + ".")}
        traced, _ = trace_model(child, report, child_prefix, child_inputs.get(name), time_steps, inner)
        if traced is not child:
            setattr(model, name, traced)
    return model, report


def holds_rewritable(module: nn.Module) -> bool:
    """Whether `module` (made opaque) holds what the passes rewrite: weight layers, neurons, other modules."""
    rule = SNNTracer()
    return any(rule.is_leaf_module(m, "") and not type(m).__module__.startswith("torch.nn")
               or isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in module.modules())


def _harmless_twins(model: nn.Module, failed: str, leaves: set[str]) -> list[str]:
    """The other modules of the failed one's class, when it holds nothing the passes rewrite (BatchNorm-and-pad
    helpers): they fail alike, so one retry covers them all instead of one retry each."""
    failed_mod = model.get_submodule(failed)
    if holds_rewritable(failed_mod):
        return []
    return [n for n, m in model.named_modules() if n and n != failed and n not in leaves
            and type(m) is type(failed_mod) and not any(n.startswith(p + ".") for p in leaves)]


def _export_front_end(model: nn.Module, example_args: tuple, report: TraceReport, prefix: str,
                      time_steps: int | None, fx_leaves: int | None = None, fx_error: str | None = None):
    """The model captured by torch.export(strict=False) (export_frontend.py) as a GraphModule, when it captures
    more than fx did (no eager root; fewer opaque leaves) and computes what the model computes on the example;
    else None. Either way the report says what was tried."""
    from .export_frontend import capture_module, outputs_differ
    where = f"'{prefix or '<root>'}'"
    why_fx = f"fx could not trace its forward ({fx_error})" if fx_error else f"fx made {fx_leaves} module(s) opaque"
    gm, cap, e = capture_module(model, example_args, _make_graph_module)
    if gm is None:
        report.front_ends.append(f"{where}: torch.export(strict=False) tried as the second front-end ({why_fx}), "
                                 f"and failed too: {e}")
        return None
    if fx_leaves is not None and len(cap.leaves_added) >= fx_leaves:
        return None
    mismatch = outputs_differ(model, gm, example_args)
    if mismatch:
        report.front_ends.append(f"{where}: torch.export(strict=False) tried as the second front-end ({why_fx}); "
                                 f"its graph was not used: {mismatch}")
        return None
    # a branch on self.training: the other mode is exported too and joined, as the fx front-end does
    single, notes = gm, []
    leaf_tracer = SNNTracer(set(dict(cap.leaves_added)))  # one tracer answers is_leaf for every module
    gm = both_modes(model, gm, leaf_tracer.is_leaf_module,
                    lambda: capture_module(model, example_args, _make_graph_module), notes, prefix)
    gm.train(model.training)  # built while the model was in the other mode
    if gm is not single and not model.training and outputs_differ(model, gm, example_args):
        gm, notes = single, [f"{where} branches on self.training; joining its exported training branch changed "
                             "the eval outputs, so the graph holds the eval branch only"]
    report.mode_branches.extend(notes)
    leaves = sorted(n for n, _ in cap.leaves_added)
    report.leaves_added.extend((f"{prefix}.{n}" if prefix else n, why) for n, why in cap.leaves_added)
    batch = "the batch size stays free" if cap.dynamic_batch else "the batch size is fixed to the example's"
    report.front_ends.append(
        f"{where} captured by torch.export(strict=False) ({why_fx}); {cap.leaf_calls} calls of leaf modules "
        f"(neurons, weight layers, torch.nn built-ins{', ' + ', '.join(leaves) if leaves else ''}) are call_module "
        f"nodes, the rest ATen ops; {batch}")
    gm.bc_trace_leaves = leaves
    gm.bc_front_end = "torch.export"
    annotate_time_steps(gm, time_steps)
    return gm


def _first_inputs(model: nn.Module, children: dict[str, nn.Module], example_args: tuple) -> dict[str, tuple]:
    """The positional inputs of each child's first call in one forward on the example (state restored after)."""
    found: dict[str, tuple] = {}

    def hook(name):
        def fn(mod, args):
            found.setdefault(name, args)
        return fn

    hooked = {}
    for n, c in children.items():
        if isinstance(c, (nn.ModuleList, nn.ModuleDict)):
            hooked.update({f"{n}.{k}": sub for k, sub in c.named_children()})
        else:
            hooked[n] = c
    handles = [c.register_forward_pre_hook(hook(n)) for n, c in hooked.items()]
    guard = _StateGuard(model)
    try:
        with torch.no_grad():
            model(*example_args)
    except Exception:  # the inputs seen before the failure are still useful; the rest trace without
        pass
    finally:
        guard.restore()
        for h in handles:
            h.remove()
    return found


def graph_modules(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """Every outermost GraphModule in `model` (the model itself when it is one)."""
    if isinstance(model, fx.GraphModule):
        return [("", model)]
    found = []
    for name, child in model.named_children():
        if isinstance(child, fx.GraphModule):
            found.append((name, child))
        else:
            found.extend((f"{name}.{n}" if n else name, g) for n, g in graph_modules(child))
    return found
