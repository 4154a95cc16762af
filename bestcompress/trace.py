"""SNN-aware tracing: neurons are leaves, failing modules become leaves, an untraceable root is recursed into.

Every fallback is written to the TraceReport: nothing is handled silently.
"""
from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .nn.lif import LIF

MAX_RETRIES = 32


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

    def lines(self) -> list[str]:
        out = []
        for name, why in self.leaves_added:
            out.append(f"'{name or '<root>'}' kept as an opaque leaf (tracing it failed: {why})")
        for name, why in self.eager:
            out.append(f"'{name or '<root>'}' runs eagerly; its children were traced instead ({why})")
        for name, value in self.concrete_args.items():
            out.append(f"forward argument '{name}' fixed to {value!r} for tracing")
        return out

    @property
    def clean(self) -> bool:
        return not self.leaves_added and not self.eager


class SNNTracer(fx.Tracer):
    """fx.Tracer whose leaves are neurons, quantized layers, and any module named in `extra_leaves`."""

    def __init__(self, extra_leaves: set[str] | None = None) -> None:
        super().__init__()
        self.extra_leaves = set(extra_leaves or ())
        self.module_stack_names: list[str] = []
        self.failed_module: str | None = None
        self._quant = _quant_layer_classes()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.extra_leaves or is_neuron(m) or (self._quant and isinstance(m, self._quant)):
            return True
        if getattr(m, "bc_leaf", False):  # modules bestcompress inserts mark themselves as leaves
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


def _trace_once(model: nn.Module, leaves: set[str], concrete: dict[str, object]):
    tracer = SNNTracer(leaves)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # record which module failed; the caller decides the fallback
        return None, tracer.failed_module, e
    gm = _make_graph_module(model, tracer.root, graph)
    return gm, None, None


def trace_model(model: nn.Module, report: TraceReport | None = None, prefix: str = ""):
    """Trace `model` into a GraphModule, falling back module by module where tracing fails.

    Args:
        model: any nn.Module (a spiking transformer).
        report: collects what could not be traced; a new one is made if None.
        prefix: qualified name of `model` inside the root (for messages).
    Returns:
        (traced, report): a GraphModule, or — when the root forward itself cannot be traced — the root module
        with each child replaced by its own traced form.
    """
    report = report if report is not None else TraceReport()
    if isinstance(model, fx.GraphModule):
        return model, report
    concrete = _none_default_args(model)
    leaves: set[str] = set()
    for _ in range(MAX_RETRIES):
        gm, failed, err = _trace_once(model, leaves, concrete)
        if gm is not None:
            if concrete:
                _rename_placeholders(gm, model)
                for k, v in concrete.items():
                    report.concrete_args[f"{prefix}.{k}" if prefix else k] = v
            gm.bc_trace_leaves = sorted(leaves)
            return gm, report
        if failed and failed not in leaves:
            leaves.add(failed)
            report.leaves_added.append((f"{prefix}.{failed}" if prefix else failed, _short(err)))
            continue
        break
    # The root's own forward cannot be traced: keep it eager and trace its children.
    report.eager.append((prefix, _short(err)))
    leaf_check = SNNTracer()
    for name, child in list(model.named_children()):
        if len(list(child.parameters())) == 0 and not list(child.children()):
            continue
        # Leaves stay the modules they are: tracing an nn.Conv2d would turn it into a GraphModule calling
        # F.conv2d, which weight swaps and call-order hooks no longer recognise. Containers are recursed into.
        if leaf_check.is_leaf_module(child, name) and not isinstance(child, (nn.ModuleList, nn.ModuleDict,
                                                                               nn.Sequential)):
            continue
        child_prefix = f"{prefix}.{name}" if prefix else name
        traced, _ = trace_model(child, report, child_prefix)
        if traced is not child:
            setattr(model, name, traced)
    return model, report


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
