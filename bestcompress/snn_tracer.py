"""The SNN-aware fx.Tracer: neurons (of every installed library) and weight layers are leaves; with an example
input every recorded node can be evaluated, so Python branches on shapes are specialised to the example's
shapes; neuron state a forward reads becomes a graph constant and neuron resets it makes become graph nodes.

Used by bestcompress/trace.py (trace_model, the fallbacks and the report) and by the feature taps.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import operator

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
    ("bestcompress.nn.norse_lif", "BoxLIFCell"),  # and the norse-form ones
    ("bestcompress.nn.norse_lif", "CurrentLIFCell"),  # (CurrentLIF is a subclass)
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
