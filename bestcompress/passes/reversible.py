"""InsertReversibleCouplings: CIE's two-stream reversible trunk with a second head (METHOD.md §3).

Per trunk stage (bestcompress/trunk.py finds them: one for a plain transformer, one per resolution for a
hierarchical model whose stages are separated by downsampling), with sub-blocks F_1..F_K alternating attention
and MLP and stage input z_0:

    z_1 = F_1(z_0) + z_0                                  (the method's x0 = None: a plain residual)
    z_k = F_k(z_{k−1}) + a_k·z_{k−2} + b_k·z_{k−1}        k = 2..K   (nn/reversible.py: ReversibleCoupling)

with `reversible.form` = `preserving` (a_k, b_k learnable, initialised at 0 and 1: the coupled model computes
exactly what the model computed before) or `paper` (a_k = b_k = ½ fixed, the public BESTformer code). Only the
last stream z_K of a stage goes on to the next stage. On the last stage, the model's head reads the last attention
stream z_{K−1} and `head2` (a copy of the head, equal weights at insertion) the last MLP stream z_K through a copy
of the ops between the trunk and the head (token/time means, ...); no block is copied or run twice, so the coupled
model costs the FP model's MACs plus head2's. Where weight layers other than the head lie between the last coupled
stage and the output (a downsampling before an empty last stage), no head2 is added: one head reads z_K.

A forward that loops over time steps in Python (snnTorch style), unrolled by the trace, holds one copy of each stage
per step (trunk.py: `Trunk.steps`). Each coupling is one module inserted once and called at every step (its a_k,
b_k shared by all steps, like the block's own weights), and head2 is one module called wherever the head is; the
per-step copies of the tail read the per-step streams.

Left unchanged, with a note: a model that already holds couplings, a model that already has two heads
(two equal-shape classifier layers that together compute its logits, as the public BESTformer code has), and a
model with one head whose blocks already pass coupled streams to each other (RevViT's Y_1 = X_1 + F(X_2),
Y_2 = X_2 + G(Y_1); BESTformer's x2 = A(x1) + (x0 + x1)/2 with the streams passed as pairs; trunk.py:
`coupled_streams` names what it found): coupling them again would rewire streams that are already coupled.
Outputs other than one tensor are kept as they are: in `(logits, None)`, `(logits, aux)` or `{'logits': ...}`
only the logits entry (the one computed from the last stage) becomes the DualHeadOutput.
"""
from __future__ import annotations

import copy
import operator
from typing import Callable

import torch
from torch import fx, nn

from ..errors import ModelError, RecipeError
from ..mode_branches import switch_of
from ..nn.reversible import FORMS, DualHeadOutput, ReversibleCoupling
from ..trace import graph_modules
from ..trunk import (  # noqa: F401  (find_trunk, find_stages: part of this module's API since the first version)
    GraphIndex, SubBlock, Trunk, add_operands, common_prefix, coupled_streams, find_stages, find_trunk, is_add,
    output_entries, output_logits, two_heads,
)
from .base import Pass, PassContext, PassError, register_pass
from .head_tail import copy_state_resets, is_stateful, tail_nodes, weight_layers
from .shapes import free_module_name

_INSERTED = (ReversibleCoupling, DualHeadOutput)


def _inserted_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, nn.Module]]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, _INSERTED):
                out.append((n, m))
    return out


def _calls_by_step(gm: fx.GraphModule) -> list[tuple[int, fx.Node, nn.Module]]:
    """(step, node, module) for every inserted node: the i-th call of a module (in graph order) is step i."""
    seen: dict[str, int] = {}
    out = []
    for n, m in _inserted_nodes(gm):
        step = seen.get(n.target, 0)
        seen[n.target] = step + 1
        out.append((step, n, m))
    return out


def coupling_steps(gm: fx.GraphModule) -> int:
    """How many times each coupling runs per forward: T for an unrolled time loop, else 1 (0 without couplings)."""
    steps = [s for s, _, m in _calls_by_step(gm) if isinstance(m, ReversibleCoupling)]
    return max(steps) + 1 if steps else 0


def coupling_nodes(gm: fx.GraphModule, stage: int | None = None, step: int | None = None) -> list[fx.Node]:
    """The ReversibleCoupling call nodes of a coupled graph, ordered by (time step, stage, k); one stage's and one
    time step's when given (an unrolled time loop calls each coupling once per step)."""
    nodes = [((t, m.stage, m.index), n) for t, n, m in _calls_by_step(gm) if isinstance(m, ReversibleCoupling)
             and (stage is None or m.stage == stage) and (step is None or t == step)]
    return [n for _, n in sorted(nodes, key=lambda t: t[0])]


def stage_name(trunk: Trunk) -> str:
    """The module prefix a stage's blocks share ('block', 'stage2'); for blocks in several containers that share
    none (Meta-SpikeFormer's ConvBlock2_1, ConvBlock2_2) the containers joined by '+' ('ConvBlock2_1+ConvBlock2_2');
    '' when a block calls no module."""
    keys = [sb.block_key or sb.where for sb in trunk.blocks]
    parts = [k.split(".") for k in keys if k]
    if not parts or len(parts) != len(keys):
        return ""
    name = common_prefix([parts[0][:-1]] + parts[1:])
    if name:
        return name
    containers = [".".join(p[:-1] if p[-1].isdigit() and len(p) > 1 else p) for p in parts]
    return "+".join(dict.fromkeys(containers))


def _names(label: str, want: str) -> bool:
    """Whether `want` names the stage labelled `label`: the label, a module prefix inside it, or one of its
    '+'-joined containers."""
    return bool(label) and any(part == want or part.startswith(want + ".") for part in [label] + label.split("+"))


def _selected(stages: list[Trunk], names: tuple[str, ...]) -> list[int]:
    if not names:
        return list(range(len(stages)))
    labels = [stage_name(t) for t in stages]
    chosen = []
    for want in names:
        hits = [i for i, lab in enumerate(labels) if want == str(i) or _names(lab, want)]
        if not hits:
            known = ", ".join(f"{i} ('{lab}')" if lab else str(i) for i, lab in enumerate(labels))
            raise RecipeError(f"reversible.stages: no trunk stage is called '{want}' (stages: {known}).")
        chosen += [i for i in hits if i not in chosen]
    return sorted(chosen)


@register_pass
class InsertReversibleCouplings(Pass):
    """Rewire each trunk stage into coupled streams (module docstring) and add head2 on the last MLP stream.

    A DualHeadOutput returns (head, head2) in training mode and, in eval mode, their mean (or one head:
    `eval_heads`). Each coupling with a_k != 0 is invertible (`reconstruct_streams`), but, as in the public
    BESTformer code, plain autograd is the default; the recipe switch `train.memory: reversible`
    (training/reversible.py) uses the inverse to rebuild streams in backward instead of storing them.

    Args:
        ctx: the pass context; options left None are read from its recipe's `reversible` section.
        eval_heads: 'mean', 'head' or 'head2'.
        form: 'preserving' (learnable a_k, b_k from the plain residual) or 'paper' (fixed ½, ½).
        stages: the stages to couple, by index ('0') or module prefix ('stage2'); empty: all of them.

    Requires: a model traced as a whole (a GraphModule) whose trunk is a chain of residual sub-blocks
    alternating attention and MLP (per stage), followed by a classifier head with weights.
    Ensures: K−1 ReversibleCoupling modules (k = 2..K) per coupled stage, each called once per time step (once
    without a time loop), and, when the last stage is coupled, a `head2` and one DualHeadOutput in place of the
    logits; applying it again changes nothing.
    """

    switch = "reversible.enabled"  # the recipe switch the Pipeline reads (passes/base.py)

    def __init__(self, ctx: PassContext | None = None, eval_heads: str | None = None, form: str | None = None,
                 stages: tuple[str, ...] | None = None, stream_bits: int | None = None) -> None:
        super().__init__(ctx)
        cfg = getattr(self.ctx.recipe, "reversible", None)
        eval_heads = eval_heads if eval_heads is not None else getattr(cfg, "eval_heads", "mean")
        form = form if form is not None else getattr(cfg, "form", "preserving")
        stages = stages if stages is not None else getattr(cfg, "stages", ())
        stream_bits = stream_bits if stream_bits is not None else getattr(cfg, "stream_bits", None)
        if eval_heads not in ("mean", "head", "head2"):
            raise ModelError(f"reversible.eval_heads must be mean, head or head2, got {eval_heads!r}.")
        if form not in FORMS:
            raise ModelError(f"reversible.form must be {' or '.join(FORMS)}, got {form!r}.")
        self.eval_heads, self.form, self.stages = eval_heads, form, tuple(stages)
        self.stream_bits = stream_bits  # None: the float stream; n: each coupling's output on an n-bit grid

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
        for entry in output_entries(gm):
            heads = two_heads(gm, entry)
            if heads:
                self.ctx.note(f"InsertReversibleCouplings: '{type(gm).__name__}' already has two heads "
                              f"({', '.join(repr(h) for h in heads)}) that compute its logits together; left "
                              "unchanged (its own streams and heads are trained as they are).")
                return gm
        found = coupled_streams(gm)
        if found:
            more = f" and {len(found) - 2} more" if len(found) > 2 else ""
            self.ctx.note(f"InsertReversibleCouplings: '{type(gm).__name__}' already has coupled streams: "
                          f"{'; '.join(found[:2])}{more}; left unchanged (its own streams are trained as they are, "
                          "with its one head).")
            return gm
        stages = find_stages(gm)
        chosen = _selected(stages, self.stages)
        last = stages[-1]
        logits = output_logits(gm, last.blocks[-1].out)
        notes = []
        streams = {}
        for s in chosen:
            streams[s] = self._couple(gm, stages[s], s, len(stages))
            where = ", ".join(sb.where or sb.out.name for sb in stages[s].blocks)
            label = f"stage {s} ('{stage_name(stages[s])}'): " if len(stages) > 1 else ""
            skipped = "".join(f"; '{sb.where or sb.out.name}' is not part of the trunk" for sb in stages[s].skipped)
            n = len(stages[s].blocks) - 1
            T = len(stages[s].steps)
            shared = f", each shared by the {T} steps of the time loop" if T else ""
            quant = f", streams on a {self.stream_bits}-bit power-of-two grid" if self.stream_bits else ""
            notes.append(f"{label}{n} {self.form} coupling{'s' if n != 1 else ''} over {len(stages[s].blocks)} "
                         f"sub-blocks ({where}){shared}{quant}{skipped}")
        left = [str(i) for i in range(len(stages)) if i not in chosen]
        if left:
            notes.append(f"stage(s) {', '.join(left)} left uncoupled (reversible.stages)")
        if len(stages) - 1 in streams:
            z = streams[len(stages) - 1]
            notes.append(self._add_head2(gm, [s[-1] for s in z], [s[-2] for s in z], logits))
        else:
            notes.append("the last stage is not coupled, so no head2 is added (one head, as before)")
        gm.graph.lint()
        gm.recompile()
        self.ctx.note("InsertReversibleCouplings: " + "; ".join(notes) + ".")
        return gm

    def _couple(self, gm: fx.GraphModule, trunk: Trunk, stage: int, n_stages: int) -> list[list[fx.Node]]:
        """Insert the couplings of one stage (one module per k, called at every time step); returns the streams
        [z_0, ..., z_K] of each step (coupling nodes for k >= 2)."""
        names = {}
        for k, sb in enumerate(trunk.blocks[1:], start=2):
            kind = "mlp" if k % 2 == 0 else "attention"
            base = f"reversible.s{stage}_z{k}" if n_stages > 1 else f"reversible.z{k}"
            names[k] = free_module_name(gm, base)
            gm.add_submodule(names[k], ReversibleCoupling(k, kind, sb.where, form=self.form, stage=stage,
                                                          stream_bits=self.stream_bits))
        loop = bool(trunk.steps)
        return [self._couple_step(gm, copy, names, t if loop else None) for t, copy in enumerate(trunk.per_step())]

    @staticmethod
    def _couple_step(gm: fx.GraphModule, trunk: Trunk, names: dict[int, str], step: int | None) -> list[fx.Node]:
        graph = gm.graph
        z = [trunk.z0, trunk.blocks[0].out]
        for k, sb in enumerate(trunk.blocks[1:], start=2):
            name = names[k]
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
            if step is not None:  # the time-step marks of trace.annotate_time_steps
                new.meta.update(bc_time_step=step, bc_step_module=name)
            z.append(new)
        return z

    def _add_head2(self, gm: fx.GraphModule, z_lasts: list[fx.Node], z_attns: list[fx.Node], logits: fx.Node) -> str:
        """head reads z_{K−1}; a copy of the tail (its modules with state copied: head2) reads z_K (the streams of
        every time step of an unrolled loop, one of each per step)."""
        graph = gm.graph
        idx = GraphIndex(gm)
        tail = tail_nodes(idx, z_lasts, logits)
        residual = [n for n in tail if idx.residual(n) is not None]
        if residual:
            raise ModelError(f"the ops after the last transformer stage of '{type(gm).__name__}' hold a residual "
                             f"block ('{residual[0].name}') that is not part of the trunk, so head2 would run it "
                             "twice; disable the couplings with --set reversible.enabled=false.")
        weights = weight_layers(gm, tail)
        if len(weights) > 1:  # a downsampling (a stage with no blocks) or layers before the head, run twice by head2
            return (f"no head2: the ops after the last coupled stage hold weight layers before the head "
                    f"({', '.join(repr(w) for w in weights[:-1])}), which a second head would run twice; "
                    "the head reads the last stream, as in the FP model")
        copies: dict[str, str] = {}
        for n in tail:
            if n.op == "call_module" and n.target not in copies and is_stateful(gm.get_submodule(n.target)):
                new_name = free_module_name(gm, f"{n.target}2")
                gm.add_submodule(new_name, copy.deepcopy(gm.get_submodule(n.target)))
                copies[n.target] = new_name
        if not copies:
            raise ModelError(f"found no classifier head (a layer with weights) after the last block of "
                             f"'{type(gm).__name__}', so head2 cannot be added; disable the couplings with "
                             "--set reversible.enabled=false.")
        copy_state_resets(graph, copies, set(tail))
        out_node = next(n for n in graph.nodes if n.op == "output")
        env: dict[fx.Node, fx.Node] = {}
        with graph.inserting_before(out_node):
            for n in tail:
                new = graph.node_copy(n, lambda a: env.get(a, a))
                if n.op == "call_module" and n.target in copies:
                    new.target = copies[n.target]
                    if "bc_step_module" in new.meta:
                        new.meta["bc_step_module"] = new.target
                env[n] = new
        for n in tail:  # the original tail now reads the attention stream (of its step)
            for z_last, z_attn in zip(z_lasts, z_attns):
                n.replace_input_with(z_last, z_attn)
        dual_name = free_module_name(gm, "dual_head")
        gm.add_submodule(dual_name, DualHeadOutput(self.eval_heads))
        switch = out_node.args[0] if isinstance(out_node.args[0], fx.Node) and switch_of(gm, out_node.args[0]) else None
        with graph.inserting_before(out_node):
            dual = graph.call_module(dual_name, (logits, env[logits]))
        if switch is not None:  # a ModeSwitch reads the logits in its branches: it moves after the DualHeadOutput
            out_node.prepend(switch)
        user = switch or out_node
        user.args = fx.node.map_arg(user.args, lambda n: dual if n is logits else n)
        pairs = ", ".join(f"'{a}' -> '{b}'" for a, b in copies.items())
        return (f"the head reads the last attention stream and its copy ({pairs}) the last MLP stream; "
                f"eval uses {self.eval_heads}")

    def check(self, model: nn.Module) -> None:
        if not isinstance(model, fx.GraphModule):
            raise PassError("InsertReversibleCouplings: the model is not a single traced graph.")
        inserted = _inserted_nodes(model)
        if not inserted:
            if any("already has two heads" in n or "already has coupled streams" in n for n in self.ctx.notes):
                return
            raise PassError("InsertReversibleCouplings: no reversible coupling in the graph.")
        for s in sorted({m.stage for _, m in inserted if isinstance(m, ReversibleCoupling)}):
            per_step = [coupling_nodes(model, s, t) for t in range(coupling_steps(model))]
            for t, nodes in enumerate(per_step):
                indices = [model.get_submodule(n.target).index for n in nodes]
                if indices != list(range(2, len(per_step[0]) + 2)):
                    where = f" at time step {t}" if len(per_step) > 1 else ""
                    raise PassError(f"InsertReversibleCouplings: stage {s} coupling indices {indices}{where} are "
                                    f"not 2..{len(per_step[0]) + 1}.")
                for i, n in enumerate(nodes[1:], start=1):
                    if n.args[2] is not nodes[i - 1] or (i >= 2 and n.args[1] is not nodes[i - 2]):
                        raise PassError(f"InsertReversibleCouplings: coupling '{n.name}' does not read the two "
                                        "streams before it.")
        duals = [n for n, m in inserted if isinstance(m, DualHeadOutput)]
        if len(duals) > 1:
            raise PassError("InsertReversibleCouplings: more than one DualHeadOutput in the graph.")
        if duals and duals[0] not in output_entries(model):
            raise PassError("InsertReversibleCouplings: the DualHeadOutput does not produce the graph's output.")


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


def _stage_nodes(gm: fx.GraphModule, stage: int) -> list[fx.Node]:
    nodes = coupling_nodes(gm, stage, 0)
    if not nodes:
        raise ModelError(f"'{type(gm).__name__}' has no reversible couplings in stage {stage} "
                         "(run InsertReversibleCouplings).")
    return nodes


def subblock_functions(gm: fx.GraphModule, stage: int = 0) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """F_1, ..., F_K of one stage of a coupled model, each a GraphModule mapping z_{k−1} to F_k(z_{k−1}).

    F_k shares its modules with `gm`. With these, `coupling.inverse(z_k, z_{k-1}, F_k(z_{k-1}))` recovers
    z_{k−2} for k >= 2. In an unrolled time loop these are the sub-blocks of the first step (later steps also read
    the neuron state the earlier ones left).
    """
    nodes = _stage_nodes(gm, stage)
    z0, z1 = nodes[0].args[1], nodes[0].args[2]
    if is_add(z1) and z0 in add_operands(z1):
        a, b = add_operands(z1)
        fs: list[Callable] = [_extract(gm, z0, b if a is z0 else a)]
    else:  # the first sub-block merged several adds: F_1 = G_1(z) − z
        g1 = _extract(gm, z0, z1)
        fs = [lambda z, g=g1: g(z) - z]
    for n in nodes:
        fs.append(_extract(gm, n.args[2], n.args[0]))
    return fs


def reconstruct_streams(gm: fx.GraphModule, z_last: torch.Tensor, z_prev: torch.Tensor,
                        stage: int = 0) -> list[torch.Tensor]:
    """Recompute every stream [z_0, ..., z_K] of one stage from its last two, z_K and z_{K−1}, alone.

    Each step divides rounding errors by a_k (z_{k−2} = (z_k − F_k(z_{k−1}) − b_k z_{k−1}) / a_k), so use float64
    for deep trunks; spiking sub-blocks can also amplify a tiny error into a flipped spike.
    Raises:
        ValueError: a coupling with a_k = 0 (a plain residual, not invertible).
    """
    fs = subblock_functions(gm, stage)
    couplings = [gm.get_submodule(n.target) for n in _stage_nodes(gm, stage)]
    streams = [z_last, z_prev]
    for k in range(len(fs), 1, -1):  # k = K .. 2
        z_k, z_km1 = streams[-2], streams[-1]
        streams.append(couplings[k - 2].inverse(z_k, z_km1, fs[k - 1](z_km1)))
    return streams[::-1]
