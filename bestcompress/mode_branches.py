"""Forwards that branch on `self.training` (`if self.training: return x, aux`, a kd model's `(head, head_kd)` in
training and their mean in eval).

fx takes a Python branch as the model takes it at trace time, and binarize traces in eval mode, so the graph would
hold the eval branch only and distill (which runs the student in training mode) would train the eval outputs.
`merge_modes` traces the training branch too and builds one graph that holds both: the nodes the two traces share
(same module or function on the same inputs) once, the nodes only one branch has, and a `ModeSwitch` (a
submodule, so model.train()/eval() reach it) that returns the training outputs in training mode and the eval
outputs in eval mode. When the training output is a pair that the eval output is computed from both of (two heads
that compute the logits together), the graph says `bc_two_heads = True`, so distill trains both heads.

After the passes (which read both branches: couplings, weight swaps), `split_branches` moves the nodes only one
mode needs into that mode's branch GraphModule behind a `BranchSwitch`, so a forward computes one branch (and
steps each stateful neuron once); the nodes both modes need stay in the graph, computed once.
"""
from __future__ import annotations

import inspect

import torch
from torch import fx, nn

__all__ = ["BranchSwitch", "ModeSwitch", "both_modes", "merge_modes", "reads_training", "split_branches", "switch_of",
           "trace_in_mode"]


class ModeSwitch(nn.Module):
    """Returns its first argument (the training outputs) in training mode, its second (the eval outputs) else."""

    def forward(self, train_out, eval_out):
        return train_out if self.training else eval_out


_SOURCE_READS: dict[type, bool] = {}


def _forward_reads_training(cls: type) -> bool:
    if cls not in _SOURCE_READS:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _SOURCE_READS[cls] = ".training" in src
    return _SOURCE_READS[cls]


def reads_training(model: nn.Module, leaves) -> bool:
    """Whether a forward fx traces through (not a leaf, not torch.nn's own) reads `.training`."""
    return any(_forward_reads_training(type(m)) for name, m in model.named_modules()
               if not type(m).__module__.startswith("torch.") and not leaves(m, name))


class _Buffers:
    """Snapshot of every buffer's values (BatchNorm running stats move when a training-mode trace runs them)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [(b, b.detach().clone()) for b in model.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)


def trace_in_mode(model: nn.Module, training: bool, trace_once):
    """`trace_once()` run with the model in the given mode (mode and buffers restored after); (gm, error)."""
    was, snap = model.training, _Buffers(model)
    model.train(training)
    try:
        gm, _, err = trace_once()
    finally:
        model.train(was)
        snap.restore()
    return gm, err


def _key(n: fx.Node, args, kwargs) -> tuple:
    return n.op, str(n.target), repr(args), repr(kwargs)


def _depends(n: fx.Node, on: fx.Node) -> bool:
    stack, seen = [n], set()
    while stack:
        m = stack.pop()
        if m is on:
            return True
        if m not in seen:
            seen.add(m)
            stack.extend(m.all_input_nodes)
    return False


def merge_modes(train_gm: fx.GraphModule, eval_gm: fx.GraphModule) -> fx.GraphModule | None:
    """`train_gm` with the eval-only nodes of `eval_gm` added and a ModeSwitch at the output; None when both
    traces are the same graph (the branch did not change what the forward computes)."""
    if train_gm.code == eval_gm.code:
        return None
    graph = train_gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    pool: dict[tuple, list[fx.Node]] = {}
    attrs = [n for n in graph.nodes if n.op == "get_attr"]
    for n in graph.nodes:
        if n.op not in ("output", "get_attr"):
            pool.setdefault(_key(n, n.args, n.kwargs), []).append(n)
    env: dict[fx.Node, fx.Node] = {}
    eval_out = None
    for n in eval_gm.graph.nodes:
        if n.op == "output":
            eval_out = fx.node.map_arg(n.args[0], env.__getitem__)
            continue
        args, kwargs = fx.node.map_arg(n.args, env.__getitem__), fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "get_attr":  # by value: the two traces number their tensor constants each in its own way
            value = _attr(eval_gm, n.target)
            same = [m for m in attrs if _same_value(_attr(train_gm, m.target), value)][:1]
            attrs.remove(same[0]) if same else None
        else:
            same = pool.get(_key(n, args, kwargs))
        if same:
            env[n] = same.pop(0)
            continue
        with graph.inserting_before(out):
            if n.op == "get_attr":
                name = _free_name(train_gm, n.target.replace(".", "_") + "_eval")
                train_gm.register_buffer(name, _attr(eval_gm, n.target), persistent=False) \
                    if isinstance(_attr(eval_gm, n.target), torch.Tensor) else setattr(train_gm, name,
                                                                                      _attr(eval_gm, n.target))
                env[n] = graph.get_attr(name)
            else:
                env[n] = graph.node_copy(n, lambda a: env[a])
    switch = _free_name(train_gm, "bc_mode_switch")
    train_gm.add_submodule(switch, ModeSwitch().train(train_gm.training))
    train_out = out.args[0]
    with graph.inserting_before(out):
        pick = graph.call_module(switch, (train_out, eval_out))
    out.args = (pick,)
    if isinstance(train_out, (tuple, list)) and len(train_out) == 2 and all(isinstance(a, fx.Node) for a in train_out) \
            and isinstance(eval_out, fx.Node) and eval_out not in train_out \
            and all(_depends(eval_out, a) for a in train_out):
        train_gm.bc_two_heads = True
    graph.lint()
    train_gm.recompile()
    return train_gm


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))
    return a is b


def _free_name(gm: nn.Module, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}{k}", k + 1
    return name


def switch_of(gm: fx.GraphModule, node: fx.Node) -> ModeSwitch | None:
    """The ModeSwitch `node` calls, if it calls one."""
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    return m if isinstance(m, ModeSwitch) else None


def both_modes(model: nn.Module, gm: fx.GraphModule, is_leaf, trace_once, notes: list[str], prefix: str = ""):
    """`gm` (traced in the model's mode) with the other mode's branch merged in when a forward fx traced through
    reads self.training; a line for the trace report goes to `notes` when the branches differ."""
    if not reads_training(model, is_leaf):
        return gm
    other, err = trace_in_mode(model, not model.training, trace_once)
    where = f"'{prefix or '<root>'}'"
    if other is None:
        mode = "training" if model.training else "eval"
        notes.append(f"{where} branches on self.training and its other branch could not be traced "
                     f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}): the graph "
                     f"holds the {mode} branch only")
        return gm
    merged = merge_modes(*((gm, other) if model.training else (other, gm)))
    if merged is None:
        return gm
    pair = "; its training outputs are two heads, trained as a pair" if getattr(merged, "bc_two_heads", False) else ""
    notes.append(f"{where} branches on self.training: both branches traced into one graph (the training outputs "
                 f"in training mode, the eval outputs in eval mode){pair}")
    return merged


# ------------------------------------------------------------------------------------------------ one branch a mode

class BranchSwitch(nn.Module):
    """The final form of a ModeSwitch (`split_branches`): the nodes only the training outputs need and those only
    the eval outputs need, each in a GraphModule of its own, and only the one of the current mode is called.

    The branch GraphModules call the owner's modules (the same objects) but are not submodules: the parameters
    and state_dict keys stay the owner's. Its arguments are the training branch's inputs, then the eval branch's.
    """

    def __init__(self, train_branch: fx.GraphModule, eval_branch: fx.GraphModule, n_train: int, n_eval: int,
                 targets: list[str]) -> None:
        super().__init__()
        self.branches = (train_branch, eval_branch)  # a tuple: not registered as submodules
        self.n_train, self.n_eval, self.targets = n_train, n_eval, list(targets)

    def forward(self, *args):
        # after both branches' inputs come the modules the branches call, as the owner holds them now: so the
        # owner's graph names them (a GraphModule copied or rebuilt keeps just those), and a module the owner
        # swapped since (the engine's packed layers, an exporter's) is the one the branch calls
        n = self.n_train + self.n_eval
        branch = self.branches[0] if self.training else self.branches[1]
        for target, module in zip(self.targets, args[n:]):
            parent, _, leaf = target.rpartition(".")
            holder = branch.get_submodule(parent) if parent else branch
            if holder._modules.get(leaf, module) is not module:
                holder._modules[leaf] = module
        return branch(*(args[:self.n_train] if self.training else args[self.n_train:n]))


def _exclusive(graph: fx.Graph, switch: fx.Node, which: int) -> list[fx.Node]:
    """The nodes that only argument `which` of `switch` needs (every use of them leads there), in graph order."""
    mine = set()
    other: set[fx.Node] = set()
    fx.node.map_arg(switch.args[1 - which], lambda n: other.add(n))
    for n in reversed(graph.nodes):
        if n.op in ("placeholder", "get_attr", "output") or n is switch or n in other or not n.users:
            continue
        if all(u in mine or u is switch for u in n.users):
            mine.add(n)
    return [n for n in graph.nodes if n in mine]


def _branch_module(gm: fx.GraphModule, nodes: list[fx.Node], out) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A GraphModule computing `out` from `nodes` (copied), and the outer nodes it takes as inputs."""
    inside, inputs, env = set(nodes), [], {}
    g = fx.Graph()

    def outer(a: fx.Node) -> fx.Node:
        if a in inside:
            return env[a]
        if a not in env:
            inputs.append(a)
            env[a] = g.placeholder(f"in_{len(inputs)}")
        return env[a]
    for n in nodes:
        env[n] = g.node_copy(n, outer)
    g.output(fx.node.map_arg(out, outer))
    sub = fx.GraphModule(gm, g, f"{type(gm).__name__}Branch")
    return sub, inputs


def split_branches(gm: fx.GraphModule) -> int:
    """Every ModeSwitch in `gm` becomes a BranchSwitch that computes only its mode's branch; returns how many.

    Run after the passes that read both branches (couplings, weight swaps): the nodes only one mode needs leave
    the graph for that mode's branch module, so a forward computes (and steps stateful neurons in) one branch.
    """
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if switch_of(gm, node) is None:
            continue
        parts = [_exclusive(graph, node, k) for k in (0, 1)]
        subs = [_branch_module(gm, parts[k], node.args[k]) for k in (0, 1)]
        name = _free_name(gm, "bc_branch_switch")
        called = sorted({n.target for n in parts[0] + parts[1] if n.op == "call_module"})
        switch = BranchSwitch(subs[0][0], subs[1][0], len(subs[0][1]), len(subs[1][1]), called)
        gm.add_submodule(name, switch.train(gm.training))
        with graph.inserting_before(node):
            anchors = tuple(graph.get_attr(t) for t in called)
            new = graph.call_module(name, tuple(subs[0][1]) + tuple(subs[1][1]) + anchors)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for n in sorted(parts[0] + parts[1], key=order.__getitem__, reverse=True):  # users first
            graph.erase_node(n)
        gm.delete_submodule(node.target)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
