"""Memory-saving backprop for the training forward (recipe `train.memory: plain | checkpoint | reversible`).

- `plain`: autograd keeps every activation its backward needs; spike tensors among them are stored as bits
  (nn/memory.py), as in every mode.
- `checkpoint`: the forward is cut into segments at the trunk's streams z_0, z_1, ..., z_K (the residual
  sub-blocks found by `trunk.find_stages`, or the couplings of a coupled model) and at every neuron's output
  (inside the tokenizer and the sub-blocks: a segment that starts at spikes keeps its input as bits). Each
  segment runs under `torch.utils.checkpoint` (use_reentrant=False): only its inputs are kept, and its inside is
  recomputed during backward, one segment at a time (peak: the saved inputs plus one segment's inside). The recomputation is exact: the random state
  is replayed, neuron state that a model keeps between calls (single-step neurons, nn/state.py) is put back to
  what it was when the segment first ran and restored afterwards, and BatchNorm running statistics are not updated
  twice. Gradients equal plain autograd's (to float rounding) and recomputed spikes equal the forward's.
- `reversible`: not built yet; runs as `checkpoint` and says so.

A model that is not one traced graph is traced for this (modules shared, nothing changed in the model); one that
cannot be traced, or has no trunk, trains with plain autograd and the run log says so once.
`memory_net(model, mode, say)` returns the module the training forward calls (the model's parameters are its
parameters; DDP may wrap it); evaluation and checkpoints use the model itself.
"""
from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Callable

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from ..errors import ModelError
from ..nn.memory import packed_spikes
from ..nn.reversible import ReversibleCoupling
from ..nn.state import stateful_modules
from ..trunk import find_stages

MODES = ("plain", "checkpoint", "reversible")
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
                with torch.no_grad():
                    for b, c in zip(self.buffers_, kept):
                        b.copy_(c)
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
    cuts = set(stream_nodes(gm))
    cuts.update(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LIF))
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


def checkpointed_runner(gm: fx.GraphModule, model: nn.Module | None = None) -> tuple[fx.GraphModule, list[Segment]]:
    """A GraphModule computing what `gm` computes, its trunk segments (module docstring) run under checkpoint.

    Shares every module and parameter with `gm`; `model` (default gm) is where neuron state is looked for.
    """
    cuts = cut_nodes(gm)
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    seg_of: dict[fx.Node, int] = {}
    lo = -1
    for j, c in enumerate(cuts):
        for n in nodes[lo + 1:pos[c] + 1]:
            if n.op not in ("placeholder", "output"):
                seg_of[n] = j
        lo = pos[c]
    members: dict[int, list[fx.Node]] = {}
    for n in nodes:
        if n in seg_of:
            members.setdefault(seg_of[n], []).append(n)
    stateful = [m for _, m in stateful_modules(model if model is not None else gm)]
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


# ------------------------------------------------------------------------------------------------ the switch

class MemoryNet(nn.Module):
    """The training forward of `model` under a memory mode; `model` is its only child (same parameters)."""

    def __init__(self, model: nn.Module, runner: Callable | None, mode: str, pack: bool = True,
                 say: Callable = print) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "runner", runner)
        object.__setattr__(self, "say", say)
        self.mode = mode
        self.pack = pack
        self._told = False

    def forward(self, *args):
        with packed_spikes(self.pack and torch.is_grad_enabled()):
            if self.runner is None or "forward" in vars(self.model):
                if self.runner is not None and not self._told:
                    self._told = True
                    self.say(f"train.memory={self.mode}: the feature taps run this model's forward themselves; "
                             "training with plain autograd")
                return self.model(*args)
            # through the model's own __call__, so that hooks on it (the feature taps') run as they would
            vars(self.model)["forward"] = self.runner
            try:
                return self.model(*args)
            finally:
                del vars(self.model)["forward"]


def memory_net(model: nn.Module, mode: str = "plain", say: Callable = print, pack: bool = True) -> MemoryNet:
    """The module a training step calls for `mode` (module docstring); says once when it falls back."""
    if mode not in MODES:
        raise ValueError(f"train.memory must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "plain":
        return MemoryNet(model, None, mode, pack, say)
    if mode == "reversible":
        say("train.memory=reversible: not built yet; recomputing with checkpoints instead")
        mode = "checkpoint"
    try:
        gm = trace_for_memory(model)
        runner, segments = checkpointed_runner(gm, model)
    except Exception as e:  # untraceable or no trunk: plain autograd, said once
        say(f"train.memory=checkpoint: cannot cut '{type(model).__name__}' into sub-blocks "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); training with plain autograd")
        return MemoryNet(model, None, "plain", pack, say)
    say(f"train.memory=checkpoint: {len(segments)} segments (cut at the trunk's streams and the neurons' spikes) "
        "recomputed in backward")
    return MemoryNet(model, runner, mode, pack, say)
