"""train.memory=checkpoint: the training forward cut into segments that backward recomputes (training/memory.py
describes the modes). `checkpointed_runner(gm)` builds a GraphModule computing what `gm` computes, sharing its
modules, with every segment run under torch.utils.checkpoint; the recomputation replays the random state, puts
kept neuron state back and leaves BatchNorm statistics as the forward left them."""
from __future__ import annotations

import operator
from contextlib import contextmanager

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from ..errors import ModelError
from ..nn.reversible import ReversibleCoupling
from ..nn.state import stateful_modules
from ..trunk import find_stages

_SKIP_STATE = ("_parameters", "_modules")


# ------------------------------------------------------------------------------------------------ neuron state

def _snapshot(mods: list[nn.Module]) -> list[dict]:
    """The state-bearing attributes of each module (dicts copied one level: spikingjelly keeps `_memories`)."""
    return [{k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(m).items()
             if k not in _SKIP_STATE and "hook" not in k} for m in mods]


def _restore(mods: list[nn.Module], snaps: list[dict]) -> None:
    for m, snap in zip(mods, snaps):
        for k in [k for k in vars(m) if k not in snap and k not in _SKIP_STATE and "hook" not in k]:
            del vars(m)[k]
        vars(m).update(snap)


def state_keepers(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that keep neuron state between calls (multi-step bestcompress neurons keep none)."""
    from ..nn.lif import LIF
    return [m for _, m in stateful_modules(model) if not (isinstance(m, LIF) and m.step_mode == "m")]


class Segment(nn.Module):
    """A contiguous part of a graph, run under checkpoint when a gradient is recorded (directly otherwise)."""

    def __init__(self, graph_module: fx.GraphModule, stateful: list[nn.Module], buffers: list[torch.Tensor],
                 name: str) -> None:
        super().__init__()
        object.__setattr__(self, "fn", graph_module)  # not a child: its modules are the model's
        object.__setattr__(self, "stateful", stateful)
        object.__setattr__(self, "buffers_", buffers)
        self.name = name

    def _contexts(self):
        start: dict = {}

        @contextmanager
        def first_run():
            start["state"] = _snapshot(self.stateful)
            yield

        @contextmanager
        def recompute():
            now = _snapshot(self.stateful)
            kept = [b.clone() for b in self.buffers_]
            _restore(self.stateful, start["state"])
            try:
                yield
            finally:
                _restore(self.stateful, now)
                for b, c in zip(self.buffers_, kept):
                    b.data.copy_(c)  # through .data: BatchNorm's backward holds its buffers and checks their version
        return first_run(), recompute()

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.fn(*args)
        return checkpoint(self.fn, *args, use_reentrant=False, context_fn=self._contexts)

    def extra_repr(self) -> str:
        return self.name


# ------------------------------------------------------------------------------------------------ cutting a graph

def stream_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Every trunk stream of a traced model (z_0..z_K of each stage; a coupled stage's from its couplings)."""
    found: set[fx.Node] = set()
    coupled = [(m.stage, m.index, n) for n in gm.graph.nodes if n.op == "call_module"
               for m in [gm.get_submodule(n.target)] if isinstance(m, ReversibleCoupling)]
    for _, _, n in coupled:
        found.update(a for a in n.args[1:3] if isinstance(a, fx.Node))
        found.add(n)
    try:
        for trunk in find_stages(gm):
            found.update(trunk.streams())
    except ModelError:
        if not found:
            raise
    return sorted(found, key={n: i for i, n in enumerate(gm.graph.nodes)}.__getitem__)


def cut_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Where the forward is cut: the trunk streams and every bestcompress neuron's output (spikes: a segment that
    starts there keeps its input as bits)."""
    from ..nn.lif import LIF
    try:
        cuts = set(stream_nodes(gm))
    except ModelError:
        cuts = set()  # no trunk (a spiking CNN, ...): the neurons alone
    cuts.update(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LIF))
    if not cuts:
        raise ModelError(f"'{type(gm).__name__}' has neither a transformer trunk nor bestcompress neurons to cut at")
    return sorted(cuts, key={n: i for i, n in enumerate(gm.graph.nodes)}.__getitem__)


def _resolve(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _segment_buffers(gm: fx.GraphModule, members: list[fx.Node]) -> list[torch.Tensor]:
    """The buffers of the modules a segment calls (BatchNorm statistics: a recomputation must not update them)."""
    found: dict[int, torch.Tensor] = {}
    for n in members:
        if n.op == "call_module":
            for b in gm.get_submodule(n.target).buffers():
                found.setdefault(id(b), b)
    return list(found.values())


def checkpointed_runner(gm: fx.GraphModule, model: nn.Module | None = None, cuts: list[fx.Node] | None = None,
                        keep: set[fx.Node] | frozenset = frozenset()) -> tuple[fx.GraphModule, list[Segment]]:
    """A GraphModule computing what `gm` computes, its trunk segments (module docstring) run under checkpoint.

    Shares every module and parameter with `gm`; `model` (default gm) is where neuron state is looked for.
    `cuts` (default `cut_nodes(gm)`) ends segments; nodes in `keep` (each a cut) stay outside any segment.
    """
    cuts = cut_nodes(gm) if cuts is None else sorted(cuts, key=list(gm.graph.nodes).index)
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    seg_of: dict[fx.Node, int] = {}
    lo = -1
    for j, c in enumerate(cuts):
        for n in nodes[lo + 1:pos[c] + 1]:
            if n.op not in ("placeholder", "output") and n not in keep:
                seg_of[n] = j
        lo = pos[c]
    members: dict[int, list[fx.Node]] = {}
    for n in nodes:
        if n in seg_of:
            members.setdefault(seg_of[n], []).append(n)
    stateful = state_keepers(model if model is not None else gm)
    graph, env, root, segments = fx.Graph(), {}, {}, []
    emitted: set[int] = set()
    for n in nodes:
        j = seg_of.get(n)
        if j is None:
            env[n] = graph.node_copy(n, lambda a: env[a])
            if n.op in ("call_module", "get_attr"):
                root[n.target] = _resolve(gm, n.target)
            continue
        if j in emitted:
            continue
        emitted.add(j)
        inside = set(members[j])
        inputs = list(dict.fromkeys(a for m in members[j] for a in m.all_input_nodes if a not in inside))
        outputs = [m for m in members[j] if any(u not in inside for u in m.users)]
        sub, sub_env = fx.Graph(), {}
        for a in inputs:
            sub_env[a] = sub.placeholder(a.name)
        for m in members[j]:
            sub_env[m] = sub.node_copy(m, lambda a: sub_env[a])
        sub.output(tuple(sub_env[o] for o in outputs))
        name = f"segment_{len(segments)}"
        seg = Segment(fx.GraphModule(gm, sub, name), stateful, _segment_buffers(gm, members[j]),
                      f"{members[j][0].name}..{members[j][-1].name}")
        segments.append(seg)
        root[name] = seg
        call = graph.call_module(name, tuple(env[a] for a in inputs))
        for i, o in enumerate(outputs):
            env[o] = graph.call_function(operator.getitem, (call, i))
    return fx.GraphModule(root, graph, f"Checkpointed{type(gm).__name__}"), segments


def trace_for_memory(model: nn.Module) -> fx.GraphModule:
    """`model` itself when it is one traced graph, else an fx trace of it that shares its modules."""
    if isinstance(model, fx.GraphModule):
        return model
    from ..trace import SNNTracer
    tracer = SNNTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
