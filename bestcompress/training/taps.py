"""Feature taps: the block outputs of a student and its teacher, collected at every forward, for the feature loss.

    with feature_taps(student, teacher) as taps:
        for x, y in loader:
            taps.clear()
            with torch.no_grad():
                t = teacher(x)
            out = student(x)
            loss, parts = cie(out, y, t, taps.student, taps.teacher)

Where the block outputs come from, per model:
- a coupled model (it holds ReversibleCoupling modules): the couplings of the MLP streams z_2, z_4, ..., z_K;
- any other model: its trunk is found by the same residual-chain analysis InsertReversibleCouplings uses
  (`bestcompress.trunk.find_stages`, every stage of a hierarchical model) on a trace, and the MLP streams (the
  outputs of the transformer blocks) are taken from the modules that return them (e.g. `block.i`), through
  forward hooks; when no module returns them (a model that is itself one traced graph), the model's forward
  runs through an fx Interpreter that records them.
With `attention=True` the taps also record, per forward, the operands of every activation×activation matmul
(Q and Kᵀ, the attention map and V, in call order, whatever the association; matmuls with a weight are skipped)
into `.student.attention` / `.teacher.attention`, through a TorchFunctionMode entered for the forward of each model
(for the attention-relation loss).
Everything is undone when the `with` block ends: hooks removed, forwards restored.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ..errors import ModelError
from ..nn.reversible import ReversibleCoupling
from ..trunk import find_stages
from ..trace import SNNTracer
from .distributed import unwrap as _unwrap


class TapList(list):
    """A model's block outputs (the list itself) and, in `.attention`, its attention matmul operand pairs."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.attention: list[tuple[torch.Tensor, torch.Tensor]] = []

    def clear(self) -> None:
        super().clear()
        self.attention.clear()


@dataclass
class FeatureTaps:
    """Block outputs of the latest forward of each model, in forward order: `student[i]` matches `teacher[i]`
    (and, when tapped, `student.attention[j]` matches `teacher.attention[j]`).

    Each forward of a model replaces its list (so a loop that never calls `clear()` holds one batch, not all).
    """

    student: TapList = field(default_factory=TapList)
    teacher: TapList = field(default_factory=TapList)

    def clear(self) -> None:
        self.student.clear()
        self.teacher.clear()


class _RecordingTracer(SNNTracer):
    """SNNTracer that remembers which module call returned which node."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, fx.Node]] = []
        self.calls: dict[str, int] = {}

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        self.calls[name] = self.calls.get(name, 0) + 1
        if isinstance(out, fx.Proxy):
            self.outputs.append((name, out.node))
        return out


@dataclass
class _Sites:
    modules: list[nn.Module] = field(default_factory=list)  # hook these ...
    graph: fx.GraphModule | None = None  # ... or run this graph and record these nodes
    nodes: list[fx.Node] = field(default_factory=list)
    calls: int = 1  # how often each module runs per forward (T for couplings shared by an unrolled time loop)

    def __len__(self) -> int:
        return len(self.modules) * self.calls or len(self.nodes)


def _mlp_streams(gm: fx.GraphModule) -> list[fx.Node]:
    return [sb.out for trunk in find_stages(gm) for copy in trunk.per_step() for sb in copy.blocks[1::2]]


def block_output_sites(model: nn.Module, role: str = "model") -> _Sites:
    """Where the outputs of `model`'s transformer blocks can be read (see the module docstring)."""
    model = _unwrap(model)
    couplings = [m for m in model.modules() if isinstance(m, ReversibleCoupling) and m.kind == "mlp"]
    if couplings:
        from ..passes.reversible import coupling_steps
        steps = coupling_steps(model) if isinstance(model, fx.GraphModule) else 1
        return _Sites(modules=sorted(couplings, key=lambda m: (m.stage, m.index)), calls=max(steps, 1))
    name = type(model).__name__
    if isinstance(model, fx.GraphModule):
        try:
            return _Sites(graph=model, nodes=_mlp_streams(model))
        except ModelError as e:
            raise ModelError(f"cannot find the block outputs of the {role} for feature alignment: {e}") from None
    tracer = _RecordingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # an untraceable model: say so in one sentence
        raise ModelError(f"cannot find the block outputs of the {role} '{name}' for feature alignment: its forward "
                         f"could not be traced ({type(e).__name__}); use distill.losses without 'feature'.") from None
    gm = fx.GraphModule(tracer.root, graph, name)
    try:
        nodes = _mlp_streams(gm)
    except ModelError as e:
        raise ModelError(f"cannot find the block outputs of the {role} for feature alignment: {e}") from None
    owner: dict[fx.Node, str] = {}
    for qualname, node in tracer.outputs:  # inner modules return first: keep the outermost owner
        if tracer.calls.get(qualname) == 1 and qualname:
            owner[node] = qualname
    if all(n in owner for n in nodes):
        return _Sites(modules=[model.get_submodule(owner[n]) for n in nodes])
    return _Sites(graph=gm, nodes=nodes)  # gm shares its modules with `model`


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node], sink: list[torch.Tensor]) -> None:
        super().__init__(gm)
        self.wanted = set(nodes)
        self.sink = sink

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.wanted:
            self.sink.append(out)
        return out


def _install(model: nn.Module, sites: _Sites, sink: list[torch.Tensor]) -> list:
    """Attach the recorders; returns undo callables."""
    undo = []
    target = _unwrap(model)
    if sites.modules:
        # each forward starts a fresh list: evaluation loops that never clear() do not pile up features
        undo.append(target.register_forward_pre_hook(lambda mod, args: sink.clear()).remove)
        for m in sites.modules:
            undo.append(m.register_forward_hook(lambda mod, args, out: sink.append(out)).remove)
        return undo
    gm, nodes = sites.graph, sites.nodes
    had = "forward" in target.__dict__
    previous = target.__dict__.get("forward")

    def forward(self, *args):
        sink.clear()
        return _Recorder(gm, nodes, sink).run(*args)

    target.forward = types.MethodType(forward, target)

    def restore():
        if had:
            target.forward = previous
        else:
            del target.forward
    undo.append(restore)
    return undo


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}


class _MatmulTap(TorchFunctionMode):
    """Appends (a, b) for every a @ b of two activations (neither is a Parameter) to `sink`."""

    def __init__(self, sink: list) -> None:
        super().__init__()
        self.sink = sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS and len(args) >= 2:
            a, b = args[0], args[1]
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 2 and b.dim() >= 2
                    and not isinstance(a, nn.Parameter) and not isinstance(b, nn.Parameter)):
                self.sink.append((a, b))
        return out


def _install_attention(model: nn.Module, sink: list) -> list:
    target = _unwrap(model)
    active: list[_MatmulTap] = []

    def pre(mod, args):
        sink.clear()
        mode = _MatmulTap(sink)
        mode.__enter__()
        active.append(mode)

    def post(mod, args, out):
        if active:
            active.pop().__exit__(None, None, None)

    handles = [target.register_forward_pre_hook(pre), target.register_forward_hook(post, always_call=True)]

    def undo():
        for h in handles:
            h.remove()
        while active:  # a forward interrupted before its post hook ran
            active.pop().__exit__(None, None, None)
    return [undo]


@contextmanager
def feature_taps(student: nn.Module, teacher: nn.Module, blocks: bool = True,
                 attention: bool = False) -> Iterator[FeatureTaps]:
    """Record the matching block outputs of `student` and `teacher` at each forward inside the `with` block.

    Args:
        student: the binary model (coupled or not; a DDP wrapper is unwrapped).
        teacher: the full-precision model with the same number of transformer blocks.
        blocks: record the block outputs (the feature loss).
        attention: also record the attention matmul operands (the attention-relation loss).
    Yields:
        FeatureTaps whose `.student` / `.teacher` lists hold the block outputs of each model's latest forward
        (`.clear()` empties them), and their `.attention` lists the matmul operand pairs.
    Raises:
        ModelError when the blocks cannot be found or their counts differ.
    """
    s_sites = t_sites = None
    if blocks:
        s_sites = block_output_sites(student, "student")
        t_sites = block_output_sites(teacher, "teacher")
        if len(s_sites) != len(t_sites):
            raise ModelError(f"the student has {len(s_sites)} transformer blocks but the teacher has "
                             f"{len(t_sites)}; feature alignment needs one teacher block per student block.")
    taps = FeatureTaps()
    undo = []
    try:
        if attention:  # first: its pre-hook opens the recording before any block-output hook runs
            undo += _install_attention(student, taps.student.attention)
            undo += _install_attention(teacher, taps.teacher.attention)
        if blocks:
            undo += _install(student, s_sites, taps.student)
            undo += _install(teacher, t_sites, taps.teacher)
        yield taps
    finally:
        for fn in reversed(undo):
            fn()
