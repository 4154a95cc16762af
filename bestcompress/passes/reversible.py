"""InsertReversibleCouplings: CIE's two-stream reversible trunk with a second head (METHOD.md §3).

How the trunk is found (on the traced graph, no names assumed):
1. A *residual add* is `add(s, f)` where the activation f depends on the activation s: s is the stream, the ops
   between s and f are the sub-block F.
2. Residual adds link into chains when an add's stream operand *is* the previous add's output (no op in between).
   Chains are maximal; a tokenizer's `x + rpe(x)` is usually followed by a reshape or transpose and so forms a
   chain of its own. Of the chains that form a valid trunk (step 3) the longest is taken; two equally long ones
   (e.g. an unrolled time loop) are an error.
3. A sub-block is *attention* when F holds an activation×activation matmul. Leading sub-blocks that are not part
   of the attention/MLP alternation (e.g. a tokenizer residual feeding the first block directly) are dropped;
   consecutive adds of one module (a block with an inner residual) are merged into one sub-block when that is
   what makes the chain pair up as (attention, MLP) per block. Matmul-free attention (Spike-driven Transformer)
   is paired by position.
"""
from __future__ import annotations

import copy
import operator
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from ..errors import ModelError
from ..nn.reversible import DualHeadOutput, ReversibleCoupling, reconstruct_previous
from ..trace import graph_modules
from .base import Pass, PassContext, PassError, register_pass
from .shapes import free_module_name

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "__add__", "__iadd__"}
_INSERTED = (ReversibleCoupling, DualHeadOutput)


# ------------------------------------------------------------------------------------------------- analysis

@dataclass
class SubBlock:
    """One residual sub-block z_out = z_in + F(z_in) (possibly several adds of one module, merged)."""

    adds: list[fx.Node]
    stream_in: fx.Node
    attention: bool
    where: str  # common module prefix of F's modules, e.g. 'block.0.attn' ('' when F calls no module)
    f_out: fx.Node | None = None  # F's output for a single add; None for merged sub-blocks (F = out − in)

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

    def streams(self) -> list[fx.Node]:
        """[z_0, z_1, ..., z_K]."""
        return [self.z0] + [b.out for b in self.blocks]


def _is_add(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _ADD_FUNCS:
        return not n.kwargs and len(n.args) == 2
    if n.op == "call_method" and n.target in _ADD_METHODS:
        return not n.kwargs and len(n.args) == 2
    return False


def _add_operands(n: fx.Node) -> tuple:
    return n.args[0], n.args[1]


class _GraphIndex:
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
        if not _is_add(n):
            return None
        a, b = _add_operands(n)
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in self.dep and b in self.dep):
            return None
        if self.pos[a] < self.pos[b] and self.depends_on(b, a):
            return a, b
        if self.pos[b] < self.pos[a] and self.depends_on(a, b):
            return b, a
        return None


def _is_act_matmul(n: fx.Node, dep: set[fx.Node]) -> bool:
    from .binarize_attention import is_matmul
    return is_matmul(n) and all(isinstance(a, fx.Node) and a in dep for a in n.args[:2])


def _common_prefix(targets: list[str]) -> str:
    parts = [t.split(".")[:-1] for t in targets]
    if not parts:
        return ""
    prefix = parts[0]
    for p in parts[1:]:
        i = 0
        while i < min(len(prefix), len(p)) and prefix[i] == p[i]:
            i += 1
        prefix = prefix[:i]
    return ".".join(prefix)


def _make_subblock(idx: _GraphIndex, adds: list[fx.Node], stream_in: fx.Node) -> SubBlock:
    region = idx.region(stream_in, adds[-1]) - set(adds[-1:])
    attention = any(_is_act_matmul(n, idx.dep) for n in region)
    targets = [n.target for n in region if n.op == "call_module"]
    f_out = None
    if len(adds) == 1:
        a, b = _add_operands(adds[0])
        f_out = b if a is stream_in else a
    return SubBlock(list(adds), stream_in, attention, _common_prefix(targets), f_out)


def _chains(idx: _GraphIndex) -> list[list[tuple[fx.Node, fx.Node]]]:
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


def _group(idx: _GraphIndex, chain: list[tuple[fx.Node, fx.Node]], merge: bool) -> list[SubBlock]:
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


def find_trunk(gm: fx.GraphModule) -> Trunk:
    """The transformer trunk of a traced model: its residual sub-blocks, alternating attention and MLP.

    Args:
        gm: a traced model (a GraphModule whose graph holds the whole forward).
    Returns:
        Trunk with z_0 and the sub-blocks F_1..F_K (K even; odd k attention, even k MLP).
    Raises:
        ModelError naming the model part when no such chain exists.
    """
    idx = _GraphIndex(gm)
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
    longest = max(len(t.blocks) for t in found)
    best = [t for t in found if len(t.blocks) == longest]
    if len(best) > 1:
        starts = ", ".join(f"'{t.blocks[0].where or t.blocks[0].out.name}'" for t in best)
        raise ModelError(f"'{name}' has {len(best)} equally long chains of transformer blocks (starting at {starts}; "
                         "e.g. a time loop unrolled by the trace), so it is unclear which one is the trunk; "
                         "disable the couplings with --set reversible.enabled=false.")
    return best[0]


# ------------------------------------------------------------------------------------------------- rewrite

def _inserted_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, nn.Module]]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, _INSERTED):
                out.append((n, m))
    return out


def coupling_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The ReversibleCoupling call nodes of a coupled graph, ordered by k."""
    nodes = [(m.index, n) for n, m in _inserted_nodes(gm) if isinstance(m, ReversibleCoupling)]
    return [n for _, n in sorted(nodes, key=lambda t: t[0])]


def _tail(idx: _GraphIndex, z_last: fx.Node, out: fx.Node) -> list[fx.Node]:
    """Nodes computing the output from the last stream (mean over tokens/T, head, ...), in graph order."""
    region = idx.region(z_last, out)
    return sorted(region, key=idx.pos.__getitem__)


def _find_head(gm: fx.GraphModule, tail: list[fx.Node]) -> fx.Node:
    with_params = [n for n in tail if n.op == "call_module"
                   and any(True for _ in gm.get_submodule(n.target).parameters())]
    named = [n for n in with_params if n.target.rpartition(".")[2].startswith(("head", "classifier", "fc"))]
    if named:
        return named[-1]
    if with_params:
        return with_params[-1]
    raise ModelError(f"found no classifier head (a layer with weights) after the last block of "
                     f"'{type(gm).__name__}', so head2 cannot be added; disable the couplings with "
                     "--set reversible.enabled=false.")


@register_pass
class InsertReversibleCouplings(Pass):
    """Rewire the trunk into z_k = F_k(z_{k−1}) + ½(z_{k−2} + z_{k−1}) and add head2 on the last MLP stream.

    The first sub-block stays a plain residual (z_1 = F_1(z_0) + z_0, the method's x0 = None). `head` then reads
    the last attention stream z_{K−1} and `head2` (a deep copy of `head`, equal weights at insertion) the last MLP
    stream z_K through a copy of the ops between the trunk and the head (token/time means, ...). A
    DualHeadOutput returns (head, head2) in training mode and, in eval mode, their mean (or one head:
    `eval_heads`). Each coupling is invertible (`reconstruct_previous`, `subblock_functions`), but — as in the
    public BESTformer code — training uses plain autograd: activation memory is NOT reduced.

    Requires: a model traced as a whole (a GraphModule) whose trunk is a chain of residual sub-blocks
    alternating attention and MLP, followed by a classifier head with weights, returning one tensor.
    Ensures: K−1 ReversibleCoupling nodes (k = 2..K) on the trunk streams, a `head2` module and one
    DualHeadOutput producing the graph's output; applying it again changes nothing.
    """

    def __init__(self, ctx: PassContext | None = None, eval_heads: str = "mean") -> None:
        super().__init__(ctx)
        if eval_heads not in ("mean", "head", "head2"):
            raise ModelError(f"reversible.eval_heads must be mean, head or head2, got {eval_heads!r}.")
        self.eval_heads = eval_heads

    def apply(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, fx.GraphModule):
            traced = [w for w, _ in graph_modules(model)]
            seen = f" (only its parts {', '.join(repr(w) for w in traced)} were traced)" if traced else ""
            raise ModelError(f"the forward of '{type(model).__name__}' could not be traced as a whole{seen}, so "
                             "the couplings cannot see how its blocks connect to each other and to the head; make "
                             "its forward traceable or disable the couplings with --set reversible.enabled=false.")
        if _inserted_nodes(model):
            self.ctx.note("InsertReversibleCouplings: the model already has reversible couplings; left unchanged.")
            return model
        gm = model
        trunk = find_trunk(gm)
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        out_val = out_node.args[0]
        if not isinstance(out_val, fx.Node):
            raise ModelError(f"'{type(gm).__name__}' returns {type(out_val).__name__}, not one logits tensor; "
                             "the couplings need a single classifier output to add head2 beside it.")
        idx = _GraphIndex(gm)
        tail = _tail(idx, trunk.blocks[-1].out, out_val)
        if out_val not in tail:
            raise ModelError(f"the output of '{type(gm).__name__}' does not depend on its last transformer block "
                             f"('{trunk.blocks[-1].where or trunk.blocks[-1].out.name}').")
        head = _find_head(gm, tail)
        graph = gm.graph

        # 1. couplings z_k = F_k(z_{k-1}) + ½(z_{k-2} + z_{k-1}) for k >= 2
        z = [trunk.z0, trunk.blocks[0].out]
        for k, sb in enumerate(trunk.blocks[1:], start=2):
            kind = "mlp" if k % 2 == 0 else "attention"
            name = free_module_name(gm, f"reversible.z{k}")
            gm.add_submodule(name, ReversibleCoupling(k, kind, sb.where))
            old = sb.out
            with graph.inserting_after(old):
                if sb.f_out is not None:
                    f = sb.f_out
                    new = graph.call_module(name, (f, z[k - 2], z[k - 1]))
                else:  # merged sub-block: F = G(z_{k-1}) − z_{k-1}
                    f = graph.call_function(operator.sub, (old, z[k - 1]))
                    with graph.inserting_after(f):
                        new = graph.call_module(name, (f, z[k - 2], z[k - 1]))
            old.replace_all_uses_with(new, delete_user_cb=lambda u, f=f, new=new: u is not new and u is not f)
            if not old.users:
                graph.erase_node(old)
            z.append(new)

        # 2. head reads z_{K-1}; a copy of the tail with head2 reads z_K
        z_last, z_attn = z[-1], z[-2]
        head_name = head.target
        head2_name = free_module_name(gm, f"{head_name}2")
        gm.add_submodule(head2_name, copy.deepcopy(gm.get_submodule(head_name)))
        env: dict[fx.Node, fx.Node] = {}
        with graph.inserting_before(out_node):
            for n in tail:
                new = graph.node_copy(n, lambda a: env.get(a, a))
                if n is head:
                    new.target = head2_name
                env[n] = new
        for n in tail:  # the original tail now reads the attention stream
            n.replace_input_with(z_last, z_attn)
        dual_name = free_module_name(gm, "dual_head")
        gm.add_submodule(dual_name, DualHeadOutput(self.eval_heads))
        with graph.inserting_before(out_node):
            dual = graph.call_module(dual_name, (out_val, env[out_val]))
        out_node.args = (dual,)
        graph.lint()
        gm.recompile()
        where = ", ".join(sb.where or sb.out.name for sb in trunk.blocks)
        skipped = "".join(f"; '{sb.where or sb.out.name}' is not part of the trunk" for sb in trunk.skipped)
        self.ctx.note(f"InsertReversibleCouplings: {len(trunk.blocks) - 1} couplings over {len(trunk.blocks)} "
                      f"sub-blocks ({where}){skipped}; '{head_name}' reads the last attention stream, "
                      f"'{head2_name}' the last MLP stream; eval uses {self.eval_heads}.")
        return gm

    def check(self, model: nn.Module) -> None:
        if not isinstance(model, fx.GraphModule):
            raise PassError("InsertReversibleCouplings: the model is not a single traced graph.")
        nodes = coupling_nodes(model)
        if not nodes:
            raise PassError("InsertReversibleCouplings: no reversible coupling in the graph.")
        indices = [model.get_submodule(n.target).index for n in nodes]
        if indices != list(range(2, len(nodes) + 2)):
            raise PassError(f"InsertReversibleCouplings: coupling indices {indices} are not 2..{len(nodes) + 1}.")
        for prev, n in zip(nodes, nodes[1:]):
            if n.args[2] is not prev or (prev is not nodes[0] and n.args[1] is not nodes[nodes.index(prev) - 1]):
                raise PassError(f"InsertReversibleCouplings: coupling '{n.name}' does not read the two streams "
                                "before it.")
        out = next(n for n in model.graph.nodes if n.op == "output")
        val = out.args[0]
        if not (isinstance(val, fx.Node) and val.op == "call_module"
                and isinstance(model.get_submodule(val.target), DualHeadOutput)):
            raise PassError("InsertReversibleCouplings: the output is not produced by the DualHeadOutput.")


# ------------------------------------------------------------------------------------------------- inverse

def _extract(gm: fx.GraphModule, src: fx.Node, dst: fx.Node) -> fx.GraphModule:
    """The sub-graph computing `dst` from `src` alone, as its own GraphModule (modules shared with `gm`)."""
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    needed, stack = set(), [dst]
    while stack:
        n = stack.pop()
        if n in needed or n is src:
            continue
        if n.op == "placeholder":
            raise ModelError(f"sub-block output '{dst.name}' depends on the model input '{n.name}', not only on "
                             f"its stream '{src.name}'.")
        needed.add(n)
        stack.extend(n.all_input_nodes)
    g = fx.Graph()
    env = {src: g.placeholder("z")}
    for n in sorted(needed, key=pos.__getitem__):
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[dst])
    return fx.GraphModule(gm, g, f"F_{dst.name}")


def subblock_functions(gm: fx.GraphModule) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """F_1, ..., F_K of a coupled model, each a GraphModule mapping z_{k−1} to F_k(z_{k−1}).

    F_k shares its modules with `gm`. With these, `reconstruct_previous(z_k, z_{k-1}, F_k(z_{k-1}))` recovers
    z_{k−2} for k >= 2.
    """
    nodes = coupling_nodes(gm)
    if not nodes:
        raise ModelError(f"'{type(gm).__name__}' has no reversible couplings (run InsertReversibleCouplings).")
    z0, z1 = nodes[0].args[1], nodes[0].args[2]
    if _is_add(z1) and z0 in _add_operands(z1):
        a, b = _add_operands(z1)
        g1 = _extract(gm, z0, b if a is z0 else a)
        fs: list[Callable] = [g1]
    else:  # the first sub-block merged several adds: F_1 = G_1(z) − z
        g1 = _extract(gm, z0, z1)
        fs = [lambda z, g=g1: g(z) - z]
    for n in nodes:
        fs.append(_extract(gm, n.args[2], n.args[0]))
    return fs


def reconstruct_streams(gm: fx.GraphModule, z_last: torch.Tensor, z_prev: torch.Tensor) -> list[torch.Tensor]:
    """Recompute every stream [z_0, ..., z_K] of a coupled model from its last two, z_K and z_{K−1}, alone.

    Each step doubles rounding errors (z_{k−2} = 2(z_k − F_k(z_{k−1})) − z_{k−1}), so use float64 for deep trunks;
    spiking sub-blocks can also amplify a tiny error into a flipped spike.
    """
    fs = subblock_functions(gm)
    streams = [z_last, z_prev]
    for k in range(len(fs), 1, -1):  # k = K .. 2
        z_k, z_km1 = streams[-2], streams[-1]
        streams.append(reconstruct_previous(z_k, z_km1, fs[k - 1](z_km1)))
    return streams[::-1]
