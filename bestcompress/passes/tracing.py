"""TraceModel: the SNN-aware tracer (bestcompress/trace.py) as a pass of the binarization pipeline."""
from __future__ import annotations

from torch import nn

from ..graph_clones import drop_redundant_clones
from ..multistep_layers import fold_multistep_convs
from ..trace import TraceReport, graph_modules, is_neuron, trace_model
from .base import Pass, PassContext, register_pass

_CARRIED_ATTRS = ("bc_spec", "bc_input_shape", "T")


@register_pass
class TraceModel(Pass):
    """Trace the module tree into GraphModules (neurons are leaves; fallbacks reported in the notes).

    Requires: an nn.Module; `ctx.example_input` for shape-specialised branches (optional), `ctx.time_steps`
    to recognise a forward unrolled over time (optional).
    Ensures: the model is a GraphModule, or an eager root holding traced children; the model's declared
    attributes (bc_spec, bc_input_shape, T) are kept; `ctx.trace_report` holds what could not be traced;
    clones the graph does not need are its inputs (graph_clones.py); multi-step Conv subclasses are their plain
    parent on the folded time axis (multistep_layers.py).
    Applying it to a traced model changes nothing.
    """

    def __init__(self, ctx: PassContext | None = None) -> None:
        super().__init__(ctx)
        self.report = TraceReport()

    def apply(self, model: nn.Module) -> nn.Module:
        x = self.ctx.example_input
        traced, self.report = trace_model(model, example_input=x, time_steps=self.ctx.time_steps)
        for attr in _CARRIED_ATTRS:
            if hasattr(model, attr) and not hasattr(traced, attr):
                setattr(traced, attr, getattr(model, attr))
        if getattr(traced, "bc_input_shape", None) is None and x is not None and hasattr(x, "shape"):
            traced.bc_input_shape = tuple(x.shape[1:])
        self.ctx.trace_report = self.report
        self.ctx.notes.extend(f"trace: {line}" for line in self.report.lines())
        folded = [f"{p}.{n}" if p else n for p, gm in graph_modules(traced) for n in fold_multistep_convs(gm)]
        if folded:  # [T, B, C, H, W] convolutions: the plain parent on the folded time and batch axes
            self.ctx.notes.append(f"trace: {len(folded)} multi-step convolution(s) ({folded[0]}, ...) run as "
                                  f"their plain parent on x.flatten(0, 1), reshaped back to [T, B, ...]")
        clones = sum(drop_redundant_clones(gm) for _, gm in graph_modules(traced))
        if clones:  # `skip = x.clone(); ...; out + skip` is then the residual x + F(x) it computes
            self.ctx.notes.append(f"trace: {clones} clone(s) replaced by their input (no in-place write in the graph)")
        self.ctx.notes.append(f"trace: {_front_end_line(traced)}")
        return traced


def _front_end_line(traced: nn.Module) -> str:
    """Which front-end traced each graph and which kinds of module it kept as leaves (call_module nodes)."""
    kinds: dict[str, int] = {}
    ends = set()
    for _, gm in graph_modules(traced):
        ends.add(getattr(gm, "bc_front_end", "torch.fx"))
        opaque = set(getattr(gm, "bc_trace_leaves", ()))
        for n in gm.graph.nodes:
            if n.op != "call_module":
                continue
            m = gm.get_submodule(n.target)
            kind = ("neuron" if is_neuron(m) else "weight layer" if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
                    else "opaque module" if n.target in opaque else "other module")
            kinds[kind] = kinds.get(kind, 0) + 1
    if not ends:
        return "front-end: none (no part of the model could be traced)"
    calls = ", ".join(f"{k} {n} call(s)" for n, k in sorted(((n, k) for k, n in kinds.items()), reverse=True))
    return f"front-end: {' and '.join(sorted(ends))}; leaf modules: {calls or 'none'}"

