"""SNN-aware tracing: neurons are leaves, failing modules become leaves, an untraceable root is recursed into.

With an example input the tracer also knows every value's concrete shape (each node is evaluated as it is
recorded), so Python branches on shapes (`len(x.shape) < 5`, `x.ndim`, `range(x.shape[0])`, `for x_t in x`)
are taken as the example input takes them: specialised, and each specialisation is reported. A neuron's stored
state read by the forward (snnTorch `mem = lif.init_leaky()`) becomes a constant of the graph, never a live
read of the membrane the previous call left. Every fallback is written to the TraceReport: nothing is handled
silently. (A little over 400 lines: tracer, value propagation and fallbacks are one mechanism.)
"""
from __future__ import annotations

import collections
import contextlib
import copy
import importlib
import inspect
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .nn.lif import LIF



def _optional_classes(spec: list[tuple[str, str]]) -> tuple[type, ...]:
    found = []
    for module_name, attr in spec:
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception:  # the library is absent or has another layout: nothing to treat as a leaf
            continue
        if isinstance(obj, type):
            found.append(obj)
    return tuple(found)


_NEURON_SPECS = [
    ("bestcompress.nn.leaky", "Leaky"),  # the snntorch-form neuron CanonicalizeNeurons puts in
    ("spikingjelly.activation_based.base", "MemoryModule"),
    ("spikingjelly.clock_driven.base", "MemoryModule"),
    ("spikingjelly.clock_driven.neuron", "BaseNode"),
    ("snntorch._neurons.neurons", "SpikingNeuron"),
    ("snntorch", "SpikingNeuron"),
    ("norse.torch.module.snn", "SNNCell"),
    ("norse.torch.module.snn", "SNN"),
    ("norse.torch.module.snn", "SNNRecurrent"),
    ("norse.torch.module.snn", "SNNRecurrentCell"),
    ("sinabs.layers", "StatefulLayer"),
]
_neuron_classes: tuple[type, ...] | None = None


def neuron_classes() -> tuple[type, ...]:
    """Our LIF plus every neuron base class of the spiking libraries that are installed."""
    global _neuron_classes
    if _neuron_classes is None:
        _neuron_classes = (LIF,) + _optional_classes(_NEURON_SPECS)
    return _neuron_classes


def is_neuron(module: nn.Module) -> bool:
    return isinstance(module, neuron_classes())


def _quant_layer_classes() -> tuple[type, ...]:
    return _optional_classes([("brevitas.nn.quant_layer", "QuantWeightBiasInputOutputLayer"),
                              ("brevitas.nn.quant_layer", "QuantNonLinearActLayer")])


@dataclass
class TraceReport:
    """What the tracer could not trace and how it handled it."""

    leaves_added: list[tuple[str, str]] = field(default_factory=list)  # (qualname, reason)
    eager: list[tuple[str, str]] = field(default_factory=list)  # modules kept eager, children traced
    concrete_args: dict[str, object] = field(default_factory=dict)
    specialised: list[str] = field(default_factory=list)  # shape branches taken as the example input takes them
    state_constants: list[str] = field(default_factory=list)  # neuron state read at trace time, now constant
    front_end: str = "torch.fx"

    def lines(self) -> list[str]:
        out = [f"front-end: {self.front_end}"] if self.front_end != "torch.fx" else []
        for name, why in self.leaves_added:
            out.append(f"'{name or '<root>'}' kept as an opaque leaf (tracing it failed: {why})")
        for name, why in self.eager:
            out.append(f"'{name or '<root>'}' runs eagerly; its children were traced instead ({why})")
        for name, value in self.concrete_args.items():
            out.append(f"forward argument '{name}' fixed to {value!r} for tracing")
        for what in self.specialised:
            out.append(f"specialised on the example input's shapes: {what}")
        if self.state_constants:
            names = ", ".join(self.state_constants[:6]) + (", ..." if len(self.state_constants) > 6 else "")
            out.append(f"neuron state read by the forward ({len(self.state_constants)}: {names}) is the fresh state "
                       "it was at trace time on every call, not the membrane the previous call left")
        return out

    @property
    def clean(self) -> bool:
        return not self.leaves_added and not self.eager


_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_UNKNOWN = object()
_VALUE, _SHAPE, _CALL = "bc_value", "bc_shape_derived", "bc_call"
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype"}


class _ShapeAwareProxy(fx.Proxy):
    """A Proxy whose length and index come from the example input's concrete shapes, where the tracer knows them."""

    def __getattr__(self, k):
        return _ShapeAwareAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.concrete(self, "len")

    def __index__(self) -> int:
        return self.tracer.concrete(self, "index")


class _ShapeAwareAttribute(fx.proxy.Attribute, _ShapeAwareProxy):
    pass


def _base(node_name: str) -> str:
    """`eq_2` -> `eq`: the same branch met once per call of a module reads as one specialisation."""
    base, sep, suffix = node_name.rpartition("_")
    return base if sep and suffix.isdigit() else node_name


def _unpatched():
    from torch.fx import _symbolic_trace
    revert = getattr(_symbolic_trace, "_maybe_revert_all_patches", None)
    return revert() if revert is not None else contextlib.nullcontext()


def _evaluate(kind: str, target, args, kwargs, root: nn.Module):
    if kind == "call_function":
        return target(*args, **kwargs)
    if kind == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    if kind == "call_module":
        return root.get_submodule(target)(*args, **kwargs)
    if kind == "get_attr":
        obj = root
        for part in str(target).split("."):
            obj = getattr(obj, part)
        return obj
    return _UNKNOWN


class SNNTracer(fx.Tracer):
    """fx.Tracer whose leaves are neurons, quantized layers, and any module named in `extra_leaves`.

    With `example_args` (the forward's positional inputs) every recorded node is also evaluated on them, so
    shape queries have concrete answers: a Python branch, `len`, `range` or iteration over a shape-derived value
    is specialised to the example's value (listed in `specialised`); branches on tensor *values* still fail.
    """

    def __init__(self, extra_leaves: set[str] | None = None, example_args: tuple | None = None) -> None:
        super().__init__()
        self.extra_leaves = set(extra_leaves or ())
        self.module_stack_names: list[str] = []
        self.failed_module: str | None = None
        self._quant = _quant_layer_classes()
        self.example_args = example_args
        self.specialised: list[str] = []
        self.state_constants: list[str] = []
        self._placeholders = 0
        self._pending: collections.deque[fx.Node] = collections.deque()
        self._evaluating = False
        self._state_calls = 0

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.extra_leaves or is_neuron(m) or (self._quant and isinstance(m, self._quant)):
            return True
        if getattr(m, "bc_leaf", False):  # modules bestcompress inserts mark themselves as leaves
            return True
        if isinstance(m, _WEIGHT_LAYERS):  # subclasses too: weight swaps replace the module the graph calls
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.module_stack_names.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = qualname  # the innermost module whose forward raised
            raise
        finally:
            self.module_stack_names.pop()

    # -- neuron state set and read by the forward --------------------------------------------------------
    def trace(self, root, concrete_args=None):
        undo = self._record_state_calls(root) if isinstance(root, nn.Module) else []
        undo_lib = self._record_library_resets(root) if isinstance(root, nn.Module) else []
        try:
            return super().trace(root, concrete_args)
        finally:
            for m, name in undo:
                m.__dict__.pop(name, None)
            for lib, name, orig in undo_lib:
                setattr(lib, name, orig)

    def _record_library_resets(self, root: nn.Module) -> list:
        """`snntorch.utils.reset(self)` / `functional.reset_net(self)` inside a forward: recorded as one
        `reset_module` node per neuron under the module it was given (for this trace only)."""
        from .nn.state import LIBRARY_RESETS, reset_module
        paths = {id(m): p for p, m in root.named_modules()}
        undo = []
        for lib_name, fn_name in LIBRARY_RESETS:
            try:
                lib = importlib.import_module(lib_name)
            except Exception:  # library absent
                continue
            orig = getattr(lib, fn_name, None)
            if orig is None:
                continue

            def wrapper(net, *args, _orig=orig, **kwargs):
                out = _orig(net, *args, **kwargs)
                if not self._evaluating and id(net) in paths:
                    base = paths[id(net)]
                    for sub, m in net.named_modules():
                        if sub and is_neuron(m):
                            mod = self.create_node("get_attr", f"{base}.{sub}" if base else sub, (), {})
                            self.create_node("call_function", reset_module, (mod,), {})
                return out
            setattr(lib, fn_name, wrapper)
            undo.append((lib, fn_name, orig))
        return undo

    def _record_state_calls(self, root: nn.Module) -> list[tuple[nn.Module, str]]:
        """Wrap each neuron's reset/init methods (for this trace only) so a call the forward makes becomes a
        graph node: `self.fc1_lif.reset_mem()` in a forward resets the neuron on every call of the graph."""
        from .nn.state import STATE_METHODS, call_state_method
        undo = []
        for path, m in root.named_modules():
            if not path or not is_neuron(m):
                continue
            for name in STATE_METHODS:
                orig = getattr(m, name, None)
                if not callable(orig) or name in m.__dict__:
                    continue

                def wrapper(*args, _orig=orig, _path=path, _name=name, **kwargs):
                    outer = self._state_calls == 0  # init_leaky() calls reset_mem(): record the outer call
                    self._state_calls += 1
                    try:
                        out = _orig(*args, **kwargs)
                    finally:
                        self._state_calls -= 1
                    if outer and not self._evaluating and not args and not kwargs:
                        mod = self.create_node("get_attr", _path, (), {})
                        self.create_node("call_function", call_state_method, (mod, _name), {})
                    return out
                m.__dict__[name] = wrapper
                undo.append((m, name))
        return undo

    def _neuron_state_name(self, t: torch.Tensor) -> str | None:
        for name, m in self.root.named_modules():
            if not is_neuron(m):
                continue
            for b, value in m._buffers.items():
                if value is t and b in m._non_persistent_buffers_set:
                    return f"{name}.{b}" if name else b
        return None

    def create_arg(self, a):
        # `mem = lif.init_leaky()` hands the forward the neuron's state buffer: recorded as a live read, every
        # call would start from the membrane the previous call left. The value at trace time is the state the
        # model asked for (a fresh one), so it becomes a constant.
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and not isinstance(a, fx.Proxy):
            name = self._neuron_state_name(a)
            if name is not None:
                self.state_constants.append(name)
                return super().create_arg(a.detach().clone())
        return super().create_arg(a)

    # -- concrete values --------------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeAwareProxy(node, self)

    def _value(self, a):
        """The example's value of a proxy/node (computed on first need), `a` itself for a constant."""
        node = a.node if isinstance(a, fx.Proxy) else a if isinstance(a, fx.Node) else None
        if node is None:
            return a
        if _VALUE not in node.meta and _CALL in node.meta:
            self._evaluate_until(node)
        return node.meta.get(_VALUE, _UNKNOWN)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.example_args is not None:
            self._remember(proxy.node, kind, target, args, kwargs)
        return proxy

    def _remember(self, node: fx.Node, kind: str, target, args, kwargs) -> None:
        """Note how to compute `node`'s value; values are computed only when a shape query needs one (most
        models ask none, and a forward on FakeTensors costs milliseconds per op)."""
        if kind == "placeholder":
            i, self._placeholders = self._placeholders, self._placeholders + 1
            if i < len(self.example_args):
                node.meta[_VALUE] = self.example_args[i]
            return
        proxies = []
        fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
        if (kind == "call_method" and target in _SHAPE_METHODS) or (
                kind == "call_function" and target is getattr and len(args) > 1 and args[1] in _SHAPE_ATTRS) or (
                kind == "call_function" and target is not getattr and proxies
                and all(p.node.meta.get(_SHAPE) for p in proxies)):
            node.meta[_SHAPE] = True
        node.meta[_CALL] = (kind, target, args, kwargs)
        self._pending.append(node)

    def _evaluate_until(self, target_node: fx.Node) -> None:
        """Compute the values of the remembered nodes in the order they were recorded, up to `target_node`."""
        while self._pending:
            node = self._pending.popleft()
            kind, target, args, kwargs = node.meta.pop(_CALL)
            unknown = []

            def val(a):
                v = self._value(a)
                if v is _UNKNOWN:
                    unknown.append(a)
                return v
            vargs, vkwargs = fx.node.map_aggregate(args, val), fx.node.map_aggregate(kwargs, val)
            if not unknown:
                self._evaluating = True
                try:
                    with torch.no_grad(), _unpatched():  # the real modules, not the tracer's patched __call__
                        node.meta[_VALUE] = _evaluate(kind, target, vargs, vkwargs, self.root)
                except Exception:  # the value stays unknown: a shape query on it fails as in plain fx
                    pass
                finally:
                    self._evaluating = False
            if node is target_node:
                return

    def _owner(self) -> str:
        stack = list(getattr(self, "module_stack", {}) or {})
        owner = (stack[-1] if stack else "") or "<root>"
        return owner.split("@")[0]  # fx names the k-th call of a module 'name@k'; one name for all calls

    def concrete(self, proxy: fx.Proxy, what: str):
        """The example's value of a shape-derived proxy used as a Python int/bool/length, or a TraceError."""
        value = self._value(proxy)
        shape_like = proxy.node.meta.get(_SHAPE) or (what == "len" and isinstance(value, torch.Tensor))
        if value is _UNKNOWN or not shape_like:
            if what == "len":
                raise RuntimeError("'len' is not supported in symbolic tracing by default")
            raise fx.proxy.TraceError(f"symbolically traced variables cannot be used as a Python {what}")
        out = {"len": len, "index": operator.index, "bool": bool}[what](value)
        self.specialised.append(f"{what}({_base(proxy.node.name)}) = {out} in '{self._owner()}'")
        return out

    def to_bool(self, obj: fx.Proxy) -> bool:
        if obj.node.meta.get(_SHAPE) and self._value(obj) is not _UNKNOWN:
            return self.concrete(obj, "bool")
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy):
        value = self._value(obj)
        if value is not _UNKNOWN and (obj.node.meta.get(_SHAPE) or isinstance(value, torch.Tensor)):
            n = len(value)  # a shape, or a tensor iterated over its first axis (`for x_t in x_seq`)
            self.specialised.append(f"iteration over {_base(obj.node.name)} ({n} items) in '{self._owner()}'")
            return iter([obj[i] for i in range(n)])
        return super().iter(obj)


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


_MODULE_INTERNALS = set(vars(nn.Module()))


class _StateGuard:
    """Restores every module's attributes and buffers after the tracer evaluated leaves on the example input
    (a stateful neuron called at trace time must not keep that call's membrane)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [(m, dict(m._buffers), {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS})
                      for m in model.modules()]

    def restore(self) -> None:
        for m, buffers, attrs in self.saved:
            m._buffers.clear()
            m._buffers.update(buffers)
            for k in [k for k in vars(m) if k not in _MODULE_INTERNALS and k not in attrs]:
                if not k.startswith("_tensor_constant"):  # the tracer's constants stay
                    delattr(m, k)
            m.__dict__.update(attrs)


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
    for n in gm.graph.nodes:
        step = None
        if n.op == "call_module" and counts[n.target] == steps:
            step = seen.get(n.target, 0)
            seen[n.target] = step + 1
            n.meta["bc_step_module"] = n.target
        else:
            ins = {a.meta.get("bc_time_step") for a in n.all_input_nodes} - {None}
            step = ins.pop() if len(ins) == 1 else None
        if step is not None:
            n.meta["bc_time_step"] = step
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
    err: Exception | None = None
    # Each failed attempt turns one more module into a leaf, so the number of modules bounds the attempts.
    for _ in range(len(list(model.modules())) + 1):
        gm, tracer, err = _trace_once(model, leaves, concrete, example_args)
        if gm is not None:
            if concrete:
                _rename_placeholders(gm, model)
                for k, v in concrete.items():
                    report.concrete_args[f"{prefix}.{k}" if prefix else k] = v
            where = f"'{prefix}': " if prefix else ""
            report.specialised.extend(where + s for s in dict.fromkeys(tracer.specialised))
            report.state_constants.extend(f"{prefix}.{s}" if prefix else s for s in dict.fromkeys(tracer.state_constants))
            gm.bc_trace_leaves = sorted(leaves)
            annotate_time_steps(gm, time_steps)
            return gm, report
        failed = tracer.failed_module
        if failed and failed not in leaves:
            leaves.add(failed)
            report.leaves_added.append((f"{prefix}.{failed}" if prefix else failed, _short(err)))
            continue
        break
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
