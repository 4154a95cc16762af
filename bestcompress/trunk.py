"""The residual trunk of a traced transformer: its stages, their (attention, MLP) sub-blocks, and its heads.

Used by InsertReversibleCouplings (where to couple, where head2 goes) and by the feature taps (which streams to
align with the teacher's), so both see the same blocks. No names are assumed; everything comes from the graph.

1. A *residual add* is `add(s, f)` where the activation f depends on the activation s: s is the stream, the ops
   between s and f are the sub-block F.
2. Residual adds link into chains when an add's stream operand *is* the previous add's output (no op in between).
   Chains are maximal; a tokenizer's `x + rpe(x)` is usually followed by a reshape or transpose and so forms a
   chain of its own, and so does each stage of a hierarchical model (the downsampling between stages breaks the
   chain).
3. A sub-block is *attention* when F holds an activation×activation matmul. Leading sub-blocks that are not part
   of the attention/MLP alternation (e.g. a tokenizer residual feeding the first block directly) are dropped;
   consecutive adds of one module (a block with an inner residual) are merged into one sub-block when that is
   what makes the chain pair up as (attention, MLP) per block. Matmul-free attention (Spike-driven Transformer,
   QKFormer's token attention) is paired by position.
4. *Time loops*: a forward that loops over time steps in Python is unrolled by the trace into one copy of the
   trunk per step (trace.py marks each node's step: `node.meta['bc_time_step']`, `gm.bc_time_steps`). Chains of
   the same sub-blocks (same modules, same kinds) found once at each step 0..T−1 are one stage whose `steps` hold
   the per-step copies, step 0 first; the stage itself describes step 0. A graph not traced by trace_model is
   marked by `find_stages` first.
5. *Stages* (`find_stages`): every chain that forms such a trunk. When they run one after the other (each stage's
   input depends on the previous stage's output: downsampling between them) they are the model's stages, in
   order. When they run side by side (towers) only the longest is a trunk, and two equally long ones are an error.
6. *Heads* (`output_logits`, `final_heads`): the logits are the output entry computed from the last stage; its
   heads are the modules with weights nearest to it (no other weighted module in between). Two of the same
   shape mean the model already has two heads (as the public BESTformer code does).
7. *Coupled streams* (`coupled_streams`): a model whose blocks already pass two streams to each other, found by
   either sign: (a) a residual add(s, F) whose sub-block F reads not s but a later stream r = s' + ... built from
   s or its sibling (RevViT: Y_2 = X_2 + G(Y_1), Y_1 = X_1 + F(X_2)); (b) a linear combination of three
   activations z_a ≺ z_b ≺ f (each depending on the one before, z_b itself a sum: a stream), as in BESTformer's
   x2 = A(x1) + (x0 + x1)/2. A plain chain z + F(z) shows neither, nor does an inner residual of one sub-block.

The module is ~490 lines because the coupled-stream signs (7) read the same graph facts as the chains and heads.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .errors import ModelError
from .mode_branches import switch_of
from .trace import annotate_time_steps

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "__add__", "__iadd__"}


@dataclass
class SubBlock:
    """One residual sub-block z_out = z_in + F(z_in) (possibly several adds of one module, merged)."""

    adds: list[fx.Node]
    stream_in: fx.Node
    attention: bool
    where: str  # common module prefix of F's modules, e.g. 'block.0.attn' ('' when F calls no module)
    f_out: fx.Node | None = None  # F's output for a single add; None for merged sub-blocks (F = out − in)
    step: int | None = None  # the time step of an unrolled loop its module calls all belong to, if any

    @property
    def out(self) -> fx.Node:
        return self.adds[-1]

    @property
    def block_key(self) -> str | None:
        """The indexed container the sub-block lives in ('block.0' of 'block.0.attn'), if any."""
        m = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", self.where)
        return m.group(1) if m else None


@dataclass
class Trunk:
    """The trunk's residual sub-blocks F_1..F_K (K = 2L, alternating attention and MLP) and its input z_0."""

    z0: fx.Node
    blocks: list[SubBlock]
    skipped: list[SubBlock] = field(default_factory=list)
    # a time loop unrolled by the trace: the stage's copy at each step 0..T-1 (the stage itself is step 0's)
    steps: list["Trunk"] = field(default_factory=list, repr=False, compare=False)

    def streams(self) -> list[fx.Node]:
        """[z_0, z_1, ..., z_K]."""
        return [self.z0] + [b.out for b in self.blocks]

    def per_step(self) -> list["Trunk"]:
        """The copies of the stage that run, one per time step of an unrolled loop ([self] without a loop)."""
        return self.steps or [self]


def is_add(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _ADD_FUNCS:
        return not n.kwargs and len(n.args) == 2
    if n.op == "call_method" and n.target in _ADD_METHODS:
        return not n.kwargs and len(n.args) == 2
    return False


def add_operands(n: fx.Node) -> tuple:
    return n.args[0], n.args[1]


class GraphIndex:
    """Topological positions and reachability queries bounded by those positions."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.dep: set[fx.Node] = set()
        for n in gm.graph.nodes:
            if n.op == "placeholder" or any(a in self.dep for a in n.all_input_nodes):
                self.dep.add(n)

    def ancestors_after(self, node: fx.Node, lower: fx.Node) -> set[fx.Node]:
        """Ancestors of `node` (itself included) positioned after `lower`."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen or self.pos[n] <= self.pos[lower]:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return seen

    def depends_on(self, node: fx.Node, src: fx.Node) -> bool:
        return any(src in n.all_input_nodes for n in self.ancestors_after(node, src))

    def region(self, src: fx.Node, dst: fx.Node) -> set[fx.Node]:
        """Nodes on a path from `src` (excluded) to `dst` (included)."""
        anc = self.ancestors_after(dst, src)
        down, stack = set(), [u for u in src.users if u in anc]
        while stack:
            n = stack.pop()
            if n in down:
                continue
            down.add(n)
            stack.extend(u for u in n.users if u in anc)
        return down

    def residual(self, n: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """(stream, f) when `n` is add(stream, f) with f depending on stream, else None."""
        if not is_add(n):
            return None
        a, b = add_operands(n)
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in self.dep and b in self.dep):
            return None
        if self.pos[a] < self.pos[b] and self.depends_on(b, a):
            return a, b
        if self.pos[b] < self.pos[a] and self.depends_on(a, b):
            return b, a
        return None


def is_act_matmul(n: fx.Node, dep: set[fx.Node]) -> bool:
    from .passes.binarize_attention import is_matmul
    return is_matmul(n) and all(isinstance(a, fx.Node) and a in dep for a in n.args[:2])


def common_prefix(parts: list[list[str]]) -> str:
    """The dotted prefix that every list of name parts starts with ('' for none)."""
    if not parts:
        return ""
    prefix = parts[0]
    for p in parts[1:]:
        i = 0
        while i < min(len(prefix), len(p)) and prefix[i] == p[i]:
            i += 1
        prefix = prefix[:i]
    return ".".join(prefix)


def _common_prefix(targets: list[str]) -> str:
    return common_prefix([t.split(".")[:-1] for t in targets])


def _make_subblock(idx: GraphIndex, adds: list[fx.Node], stream_in: fx.Node) -> SubBlock:
    region = idx.region(stream_in, adds[-1]) - set(adds[-1:])
    attention = any(is_act_matmul(n, idx.dep) for n in region)
    targets = [n.target for n in region if n.op == "call_module"]
    f_out = None
    if len(adds) == 1:
        a, b = add_operands(adds[0])
        f_out = b if a is stream_in else a
    steps = {n.meta.get("bc_time_step") for n in region if n.op == "call_module" and "bc_step_module" in n.meta}
    step = steps.pop() if len(steps) == 1 else None
    return SubBlock(list(adds), stream_in, attention, _common_prefix(targets), f_out, step)


def _chains(idx: GraphIndex) -> list[list[tuple[fx.Node, fx.Node]]]:
    """Maximal chains of residual adds [(add, stream), ...], each add's stream being the previous add."""
    res = {}
    for n in idx.gm.graph.nodes:
        r = idx.residual(n)
        if r is not None:
            res[n] = r[0]
    succ: dict[fx.Node, list[fx.Node]] = {}
    for add, stream in res.items():
        succ.setdefault(stream, []).append(add)
    chains = []
    for add, stream in res.items():
        if stream in res and len(succ[stream]) == 1:
            continue  # not the start of a chain
        chain = [(add, stream)]
        while len(succ.get(chain[-1][0], [])) == 1:
            nxt = succ[chain[-1][0]][0]
            chain.append((nxt, chain[-1][0]))
        chains.append(chain)
    return chains


def _group(idx: GraphIndex, chain: list[tuple[fx.Node, fx.Node]], merge: bool) -> list[SubBlock]:
    singles = [_make_subblock(idx, [a], s) for a, s in chain]
    if not merge:
        return singles
    groups: list[SubBlock] = []
    for sb in singles:
        last = groups[-1] if groups else None
        if last is not None and sb.where and sb.where == last.where and not (sb.attention or last.attention):
            groups[-1] = _make_subblock(idx, last.adds + sb.adds, last.stream_in)
        else:
            groups.append(sb)
    return groups


def _trim_and_validate(blocks: list[SubBlock]) -> tuple[list[SubBlock], list[SubBlock], str | None]:
    """(trunk, skipped leading sub-blocks, None) or ([], [], why it is not a trunk)."""
    if any(b.attention for b in blocks):
        first = next(i for i, b in enumerate(blocks) if b.attention)
    else:
        keyed = [i for i, b in enumerate(blocks) if b.block_key is not None]
        first = keyed[0] if keyed else 0  # drop leading sub-blocks outside the indexed blocks (a tokenizer's)
    skipped, trunk = blocks[:first], blocks[first:]
    if len(trunk) < 2:
        return [], [], "it has fewer than two residual sub-blocks (an attention and an MLP)"
    if len(trunk) % 2:
        return [], [], f"it has an odd number ({len(trunk)}) of residual sub-blocks"
    if any(b.attention for b in trunk):
        for i, b in enumerate(trunk):
            if b.attention != (i % 2 == 0):
                kind = "attention" if b.attention else "an MLP"
                return [], [], (f"sub-block {i + 1} ('{b.where or b.out.name}') is {kind} where the alternation "
                                "attention, MLP, attention, ... expects the other kind")
    for a, m in zip(trunk[0::2], trunk[1::2]):
        if a.block_key is not None and m.block_key is not None and a.block_key != m.block_key:
            return [], [], (f"its sub-blocks do not pair up per block ('{a.where}' is followed by '{m.where}')")
    return trunk, skipped, None


def _sequential(idx: GraphIndex, stages: list[Trunk]) -> bool:
    """True when each stage's input depends on the previous stage's output."""
    return all(idx.depends_on(b.z0, a.blocks[-1].out) or b.z0 is a.blocks[-1].out for a, b in zip(stages, stages[1:]))


def find_stages(gm: fx.GraphModule) -> list[Trunk]:
    """The trunk stages of a traced model, in forward order (one for a plain transformer; see the module docstring).

    Args:
        gm: a traced model (a GraphModule whose graph holds the whole forward).
    Returns:
        One Trunk per stage; each has sub-blocks F_1..F_K (K even; odd k attention, even k MLP).
    Raises:
        ModelError naming the model part when no trunk exists or two chains are equally good candidates.
    """
    if not hasattr(gm, "bc_time_steps"):  # traced elsewhere (e.g. the feature taps' teacher): mark the steps
        annotate_time_steps(gm)
    idx = GraphIndex(gm)
    found = _merge_time_steps(gm, _valid_trunks(idx, gm))
    found.sort(key=lambda t: idx.pos[t.z0])
    if len(found) > 1 and _sequential(idx, found):
        return found
    return [_longest(found, gm)]


def find_trunk(gm: fx.GraphModule) -> Trunk:
    """The longest stage of a traced model's trunk (the only one for a plain transformer); see `find_stages`."""
    stages = find_stages(gm)
    return max(stages, key=lambda t: len(t.blocks))


def _trunk_step(trunk: Trunk) -> int | None:
    steps = {sb.step for sb in trunk.blocks}
    return steps.pop() if len(steps) == 1 else None


def _merge_time_steps(gm: fx.GraphModule, found: list[Trunk]) -> list[Trunk]:
    """Chains of the same sub-blocks found once at each step of an unrolled time loop become one stage."""
    T = getattr(gm, "bc_time_steps", None)
    if not T or T < 2:
        return found
    groups: dict[tuple, list[Trunk]] = {}
    for t in found:
        groups.setdefault(tuple((sb.where, sb.attention, len(sb.adds)) for sb in t.blocks), []).append(t)
    merged = []
    for members in groups.values():
        steps = [_trunk_step(t) for t in members]
        if None in steps or sorted(steps) != list(range(T)) or not all(sb.where for sb in members[0].blocks):
            merged.extend(members)  # not one copy per step of the same modules: chains of their own
            continue
        ordered = [t for _, t in sorted(zip(steps, members), key=lambda p: p[0])]
        first = ordered[0]
        merged.append(Trunk(first.z0, first.blocks, first.skipped, steps=ordered))
    return merged


def _valid_trunks(idx: GraphIndex, gm: fx.GraphModule) -> list[Trunk]:
    chains = _chains(idx)
    name = type(gm).__name__
    if not chains:
        raise ModelError(f"found no residual sub-blocks (x + F(x)) in '{name}', so there is no transformer trunk "
                         "to couple; disable the couplings with --set reversible.enabled=false.")
    found: list[Trunk] = []
    why_not: dict[int, str] = {}
    for i, chain in enumerate(chains):
        for merge in (False, True):
            trunk, skipped, why = _trim_and_validate(_group(idx, chain, merge))
            if trunk:
                found.append(Trunk(trunk[0].stream_in, trunk, skipped))
                break
            why_not.setdefault(i, why)
    if not found:
        i = max(range(len(chains)), key=lambda j: len(chains[j]))
        parts = ", ".join(sb.where or sb.out.name for sb in _group(idx, chains[i], False))
        raise ModelError(f"cannot identify the transformer blocks of '{name}': the longest residual chain "
                         f"({parts}) is not a sequence of (attention, MLP) sub-blocks because {why_not[i]}; "
                         "disable the couplings with --set reversible.enabled=false.")
    return found


def _longest(found: list[Trunk], gm: fx.GraphModule) -> Trunk:
    longest = max(len(t.blocks) for t in found)
    best = [t for t in found if len(t.blocks) == longest]
    if len(best) > 1:
        starts = ", ".join(f"'{t.blocks[0].where or t.blocks[0].out.name}'" for t in best)
        raise ModelError(f"'{type(gm).__name__}' has {len(best)} equally long chains of transformer blocks "
                         f"(starting at {starts}), so it is unclear which one is the trunk; disable the "
                         "couplings with --set reversible.enabled=false.")
    return best[0]


# ------------------------------------------------------------------------------------------------- outputs, heads

def output_entries(gm: fx.GraphModule) -> list[fx.Node]:
    """The fx Nodes in the graph's output (a tensor, or the entries of a tuple/list/dict; Nones skipped; both
    branches of a ModeSwitch, bestcompress/mode_branches.py)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    entries: list[fx.Node] = []

    def add(n: fx.Node) -> fx.Node:  # through a ModeSwitch: the training outputs, then the eval outputs
        fx.node.map_arg(n.args, add) if switch_of(gm, n) is not None else entries.append(n)
        return n
    fx.node.map_arg(out.args[0], add)
    return entries


def output_logits(gm: fx.GraphModule, last: fx.Node) -> fx.Node:
    """The output entry computed from `last` (the last stream of the last stage): the logits.

    Raises:
        ModelError when no entry, or more than one, depends on `last`.
    """
    idx = GraphIndex(gm)
    entries = [n for n in output_entries(gm) if n is last or idx.depends_on(n, last)]
    name = type(gm).__name__
    if not entries:
        raise ModelError(f"the output of '{name}' does not depend on its last transformer block ('{last.name}').")
    if len(set(entries)) > 1:
        raise ModelError(f"'{name}' returns {len(entries)} outputs computed from its last block "
                         f"({', '.join(n.name for n in entries)}), so it is unclear which are the logits; return "
                         "the logits first and auxiliary outputs from earlier blocks, or disable the couplings.")
    return entries[0]


def _has_params(gm: fx.GraphModule, n: fx.Node) -> bool:
    return n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).parameters())


def final_heads(gm: fx.GraphModule, logits: fx.Node) -> list[fx.Node]:
    """The call nodes of modules with weights that feed `logits` with no other weighted module (and no residual
    add: the trunk) in between."""
    idx = GraphIndex(gm)
    heads, seen, stack = [], set(), [logits]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _has_params(gm, n):
            heads.append(n)
        elif idx.residual(n) is None:
            stack.extend(n.all_input_nodes)
    return heads


def _weight_shape(m: nn.Module):
    w = getattr(m, "weight", None)
    return tuple(w.shape) if isinstance(w, torch.Tensor) else None


def two_heads(gm: fx.GraphModule, logits: fx.Node) -> list[str]:
    """The names of two (or more) equal-shape heads that together compute `logits`, or [] for one head."""
    heads = final_heads(gm, logits)
    groups: dict[tuple, list[str]] = {}
    for n in heads:
        m = gm.get_submodule(n.target)
        groups.setdefault((type(m), _weight_shape(m)), []).append(n.target)
    for (_, shape), names in groups.items():
        if shape is not None and len(set(names)) >= 2:
            return sorted(set(names))
    return []


# ------------------------------------------------------------------------------------------------- coupled streams

_SUB_FUNCS = {operator.sub, operator.isub, torch.sub}
_SCALE_FUNCS = {operator.mul, operator.truediv, torch.mul, torch.div, torch.true_divide}


def _combination_inputs(n: fx.Node, dep: set[fx.Node]) -> list[fx.Node] | None:
    """The activation inputs of `n` when it is a sum, difference or scaling (by a non-activation) of them."""
    if n.kwargs or len(n.args) != 2 or n.op not in ("call_function", "call_method"):
        return None
    name = n.target if n.op == "call_method" else None
    acts = [a for a in n.args if isinstance(a, fx.Node) and a in dep]
    if is_add(n) or n.target in _SUB_FUNCS or name in ("sub", "__sub__"):
        return acts
    scale = n.target in _SCALE_FUNCS or name in ("mul", "div", "__mul__", "__truediv__")
    return acts if scale and len(acts) == 1 and (n.target in (operator.mul, torch.mul, "mul", "__mul__")
                                                 or n.args[0] is acts[0]) else None  # x / c, not c / x


def _terms(n: fx.Node, dep: set[fx.Node]) -> list[fx.Node]:
    """The activation terms of the linear combination `n`, flattened through the sums and scalings that only it
    uses (a stream used elsewhere too is one term)."""
    terms, stack = [], [n]
    while stack:
        m = stack.pop()
        inner = _combination_inputs(m, dep) if m is n or len(m.users) == 1 else None
        if inner is None:
            terms.append(m)
        else:
            stack.extend(inner)
    return list(dict.fromkeys(terms))


def _where(idx: GraphIndex, src: fx.Node, dst: fx.Node) -> str:
    """The module prefix of the sub-block between two nodes ('' when it calls no module)."""
    return _common_prefix([n.target for n in idx.region(src, dst) if n.op == "call_module"])


def _siblings(q: fx.Node, s: fx.Node) -> bool:
    """Two outputs of one split (RevViT's `X_1, X_2 = chunk(x, 2)`)."""
    return all(n.op == "call_function" and n.target is operator.getitem for n in (q, s)) and q.args[0] is s.args[0]


def _skips_past(idx: GraphIndex, n: fx.Node) -> str | None:
    """Sign (a): the residual add `n` = s + F(r) whose sub-block F reads a stream r = q + ... with q = s, a sum
    or s's sibling, and not s."""
    r = idx.residual(n)
    if r is None:
        return None
    s, f = r
    region = idx.region(s, f)
    for m in sorted(region, key=idx.pos.__getitem__):
        if m is f or not is_add(m) or not _where(idx, m, f):
            continue
        outside = [a for a in add_operands(m) if isinstance(a, fx.Node) and a in idx.dep and a not in region]
        if any(q is s or is_add(q) or _siblings(q, s) for q in outside):
            return f"'{_where(idx, m, f)}' reads the stream '{m.name}' but its residual adds '{s.name}'"
    return None


def _three_streams(idx: GraphIndex, n: fx.Node) -> str | None:
    """Sign (b): the sum `n` combines z_a ≺ z_b ≺ f, z_b itself a sum."""
    if not is_add(n):
        return None
    terms = sorted(_terms(n, idx.dep), key=idx.pos.__getitem__)
    for i, a in enumerate(terms):
        for j, b in enumerate(terms[i + 1:], i + 1):
            if _combination_inputs(b, idx.dep) is None or not idx.depends_on(b, a):
                continue
            for c in terms[j + 1:]:
                if idx.depends_on(c, b):
                    return (f"'{n.name}' adds the streams '{a.name}' and '{b.name}' to the output of "
                            f"'{_where(idx, b, c) or c.name}'")
    return None


def coupled_streams(gm: fx.GraphModule) -> list[str]:
    """Signs that `gm`'s blocks already pass coupled streams to each other (module docstring, 7), one sentence
    fragment per add, in graph order; [] for a plain residual trunk."""
    idx = GraphIndex(gm)
    signs = (_three_streams(idx, n) or _skips_past(idx, n) for n in gm.graph.nodes)
    return [s for s in signs if s]
