"""BinarizeAttention: binary spiking attention maps with a learnable per-step, per-head scale (BESTformer)."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import ModelError
from ..nn.attention import AttentionMapNeuron, AttentionScale, StepAttentionScale, StepMapNeuron
from ..nn.intercept import InterceptedAttention, probe_attention
from ..trace import graph_modules, is_neuron
from .base import Pass, PassContext, PassError, register_pass
from .shapes import free_module_name, node_shape, propagate_shapes, record_calls

_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_SCALAR_FUNCS = {operator.mul, operator.truediv, torch.mul, torch.div}
_SCALAR_METHODS = {"mul", "div", "contiguous", "float", "to", "clone"}
_SOFTMAX_FUNCS = {torch.softmax, torch.nn.functional.softmax}
_DROPOUT_FUNCS = {torch.nn.functional.dropout}


def is_matmul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _MATMUL_FUNCS) or (
        n.op == "call_method" and n.target in _MATMUL_METHODS)


def _is_softmax(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _SOFTMAX_FUNCS) or (n.op == "call_method" and n.target == "softmax")


def _tensor_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.args if isinstance(a, fx.Node)] + [a for a in n.kwargs.values() if isinstance(a, fx.Node)]


def input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a placeholder (activations, not parameters)."""
    dep: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _pass_through(n: fx.Node, gm: fx.GraphModule, dep: set[fx.Node]) -> bool:
    """Ops that keep a map a map: scaling by a constant, dropout, layout no-ops, softmax (checked later)."""
    if len([a for a in _tensor_inputs(n) if a in dep]) != 1:
        return False
    if n.op == "call_function":
        return n.target in _SCALAR_FUNCS or n.target in _SOFTMAX_FUNCS or n.target in _DROPOUT_FUNCS
    if n.op == "call_method":
        return n.target in _SCALAR_METHODS or n.target == "softmax"
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), (nn.Dropout, AttentionMapNeuron))
    return False


@dataclass
class AttentionChain:
    mm1: fx.Node  # the first activation×activation product (the map)
    mm2: fx.Node  # the product that consumes it
    path: list[fx.Node]  # pass-through ops from mm1 to mm2, in order
    side: int  # 0: mm2 = f(mm1) @ c ("qk" form); 1: mm2 = c @ f(mm1) ("kv" form)

    @property
    def form(self) -> str:
        return "qk" if self.side == 0 else "kv"


def find_attention_chains(gm: fx.GraphModule) -> list[AttentionChain]:
    """Every pair of activation×activation matmuls where the second consumes the first (via pass-through ops)."""
    dep = input_dependent(gm)
    chains = []
    for mm2 in gm.graph.nodes:
        if not is_matmul(mm2) or not all(a in dep for a in mm2.args[:2]):
            continue
        for side in (0, 1):
            node, path = mm2.args[side], []
            while not is_matmul(node) and _pass_through(node, gm, dep) and len(node.users) == 1:
                path.insert(0, node)
                node = next(a for a in _tensor_inputs(node) if a in dep)
            if is_matmul(node) and all(a in dep for a in node.args[:2]):
                chains.append(AttentionChain(node, mm2, path, side))
                break
    return chains


def _already_binary(gm: fx.GraphModule, chain: AttentionChain) -> bool:
    for user in chain.mm1.users:
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), AttentionMapNeuron):
            return True
    return False


def _owner_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return ""


@register_pass
class BinarizeAttention(Pass):
    """Insert the binary map neuron (LIF, soft reset, V_th 1) on every Q·Kᵀ·V chain and scale its output by λ.

    Requires: a traced model and an example input (for shapes); `ctx.time_steps` when maps merge T and B.
    Ensures: every activation×activation matmul chain reads a binary {0,1} map; its product is scaled by
    λ of shape [T, 1, heads, 1, 1]; Hadamard-style attention (no matmul) is left alone with a note.
    Attention that a model calls once per time step (it loops over time, eagerly or unrolled in a graph) gets a
    single-step map neuron that keeps its membrane over the T calls of one forward and a per-step λ.
    """

    switch = "attention.binarize"

    @classmethod
    def from_recipe(cls, recipe, ctx: PassContext) -> "BinarizeAttention":
        a = recipe.attention
        return cls(ctx, map=a.map, v_threshold=a.v_threshold, tau=a.tau, learnable_scale=a.learnable_scale,
                   softmax=a.softmax)

    def __init__(self, ctx: PassContext | None = None, map: str = "auto", v_threshold: float = 1.0,
                 tau: float = 2.0, learnable_scale: bool = True, softmax: str = "error") -> None:
        super().__init__(ctx)
        if map not in ("auto", "qk", "kv"):
            raise ModelError(f"attention.map must be auto, qk or kv, got {map!r}.")
        self.map = map
        self.v_threshold = v_threshold
        self.tau = tau
        self.learnable_scale = learnable_scale
        self.softmax = softmax
        self.binarized: list[str] = []
        self._per_step = False
        self._unrolled: set[str] = set()
        self._shared_names: dict[str, tuple[str, str | None]] = {}
        self._shared_steps: dict[str, int] = {}
        self._shared_state: dict[str, fx.Node] = {}

    # -- graph path -------------------------------------------------------------------------------------
    def _layout(self, shape: tuple[int, ...] | None) -> tuple[int, int, bool]:
        """(T, heads, time_merged) of a map/product of shape [T,B,h,a,b] or [T·B,h,a,b] or [T·B,a,b]."""
        if shape is None:
            raise ModelError("could not infer the attention map's shape; give an example input.")
        T = self.ctx.time_steps
        if self._per_step and len(shape) != 5:  # one time step per call: [B, h, a, b] or [B, a, b]
            return T, (shape[-3] if len(shape) >= 4 else 1), False
        if len(shape) == 5:
            return shape[0], shape[2], False
        batch = self._example_batch()
        if len(shape) == 4 and T is not None and batch is not None and shape[0] == T and shape[1] == batch:
            return T, 1, False  # time-first, one head: [T, B, a, b] (not T·B merged with B heads)
        if T is None:
            raise ModelError("the attention map merges time and batch; the model's time steps (T) are unknown.")
        heads = shape[-3] if len(shape) >= 4 else 1
        return T, heads, True

    def _example_batch(self) -> int | None:
        x = self.ctx.example_input
        x = x[0] if isinstance(x, (tuple, list)) and x else x
        return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    def _rewrite(self, gm: fx.GraphModule, chain: AttentionChain) -> None:
        graph = gm.graph
        softmaxes = [n for n in chain.path if _is_softmax(n)]
        if softmaxes and self.softmax != "replace":
            raise ModelError(f"attention at node '{chain.mm2.name}' uses softmax, which a binary spiking map "
                             "cannot reproduce; set attention.softmax: replace to swap it for the spiking map.")
        mm2_shape = node_shape(chain.mm2)
        target = self.map if self.map != "auto" else chain.form
        owner = _owner_path(chain.mm2)
        prefix = f"{owner}." if owner else ""
        # A loop over time unrolled into this graph: the T chains of one attention module share one stateful
        # map neuron and one λ, called once per step in graph order.
        shared = owner in self._unrolled and mm2_shape is not None and len(mm2_shape) != 5
        per_step, self._per_step = self._per_step, self._per_step or shared
        try:
            self._rewrite_chain(gm, chain, target, owner, prefix, mm2_shape, softmaxes, shared)
        finally:
            self._per_step = per_step

    def _rewrite_chain(self, gm, chain, target, owner, prefix, mm2_shape, softmaxes, shared) -> None:
        graph = gm.graph
        names = self._shared_names.get(owner) if shared else None
        step = self._shared_steps.get(owner, 0) if shared else None
        with graph.inserting_before(chain.mm2):
            if target == chain.form:
                first = chain.mm1
            else:
                # Re-associate: no softmax in between, so Q(KᵀV) = (QKᵀ)V exactly in real arithmetic.
                a, b = chain.mm1.args[:2]
                c = chain.mm2.args[1 - chain.side]
                first = graph.call_function(torch.matmul, (c, a) if target == "qk" else (b, c))
            T, heads, merged = self._layout(mm2_shape)
            if names:
                neuron_name = names[0]
            else:
                neuron_name = free_module_name(gm, f"{prefix}attn_map_lif")
                neuron = StepMapNeuron(T, tau=self.tau, v_threshold=self.v_threshold) if shared \
                    else self._map_neuron(T, merged)
                gm.add_submodule(neuron_name, neuron)
            spikes = self._insert_neuron(graph, neuron_name, first, owner if shared else None,
                                         after=target == chain.form)
            if target == chain.form:
                chain.mm1.replace_all_uses_with(spikes, delete_user_cb=lambda u: u is not spikes
                                                and u not in spikes.all_input_nodes)
                for s in softmaxes:
                    s.replace_all_uses_with(s.args[0] if isinstance(s.args[0], fx.Node) else s.kwargs["input"])
                    graph.erase_node(s)
                product = chain.mm2
            else:
                a, b = chain.mm1.args[:2]
                c = chain.mm2.args[1 - chain.side]
                product = graph.call_function(torch.matmul, (spikes, b) if target == "qk" else (a, spikes))
                last = product
                originals = (chain.mm1, *chain.path)
                for op in chain.path:  # re-apply the constant scaling the original map carried
                    last = graph.node_copy(op, lambda x, prev=last: prev if x in originals else x)
                chain.mm2.replace_all_uses_with(last)
                graph.erase_node(chain.mm2)
                for op in reversed(chain.path):
                    graph.erase_node(op)
                graph.erase_node(chain.mm1)
                product = last
        scale_name = None
        if self.learnable_scale:
            if names:
                scale_name = names[1]
            else:
                scale_name = free_module_name(gm, f"{prefix}attn_scale")
                gm.add_submodule(scale_name, self._map_scale(T, heads, merged))
            with graph.inserting_after(product):
                # an unrolled time loop passes its step; otherwise the scale knows its layout
                scaled = graph.call_module(scale_name, (product,) if step is None else (product, step % T))
            product.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
        if shared:
            self._shared_steps[owner] = step + 1
            if not names:
                self._shared_names[owner] = (neuron_name, scale_name)
        if not names:
            self.binarized.append(f"{owner or gm.__class__.__name__}:{chain.form}->{target}"
                                  + (" (per step)" if self._per_step else ""))

    def _insert_neuron(self, graph: fx.Graph, name: str, first: fx.Node, owner: str | None, after: bool) -> fx.Node:
        """The map neuron's call on `first`; for an unrolled time loop (`owner` set) its membrane is threaded
        from the previous step's call of the same neuron: `spikes, v = neuron(map, v_prev)`."""
        args = (first,) if owner is None else (first, self._shared_state.get(owner))
        if after:
            with graph.inserting_after(first):
                out = graph.call_module(name, args)
        else:  # the caller's insertion point (before the product)
            out = graph.call_module(name, args)
        if owner is None:
            return out
        with graph.inserting_after(out):
            v_next = graph.call_function(operator.getitem, (out, 1))
        with graph.inserting_after(out):
            spikes = graph.call_function(operator.getitem, (out, 0))
        self._shared_state[owner] = v_next
        return spikes

    # -- per-step models (the model loops over time and calls the attention once per step) -------------
    def _is_per_step(self, calls: int) -> bool:
        """Called a multiple of T times in one forward: the model loops over time and this runs once per step."""
        T = self.ctx.time_steps
        return bool(T and T > 1 and calls >= T and calls % T == 0)

    def _map_neuron(self, T: int, merged: bool) -> AttentionMapNeuron:
        neuron = AttentionMapNeuron(T, tau=self.tau, v_threshold=self.v_threshold, time_merged=merged)
        if self._per_step:  # keep the membrane across the T calls of one forward, then start afresh
            neuron.step_mode, neuron.period = "s", T
        return neuron

    def _map_scale(self, T: int, heads: int, merged: bool) -> AttentionScale:
        return StepAttentionScale(T, heads) if self._per_step else AttentionScale(T, heads, time_merged=merged)

    def _apply_graph(self, gm: fx.GraphModule) -> int:
        count = 0
        chains = [c for c in find_attention_chains(gm) if not _already_binary(gm, c)]
        owners: dict[str, int] = {}
        for c in chains:
            owners[_owner_path(c.mm2)] = owners.get(_owner_path(c.mm2), 0) + 1
        T = self.ctx.time_steps
        self._unrolled = {o for o, k in owners.items() if T and T > 1 and k == T and not self._per_step}
        self._shared_names = {}
        self._shared_steps: dict[str, int] = {}
        self._shared_state: dict[str, fx.Node] = {}
        for chain in chains:
            shared_before = _owner_path(chain.mm2) in self._shared_names
            self._rewrite(gm, chain)
            count += 0 if shared_before else 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return count

    # -- eager path (blocks that could not be traced) ---------------------------------------------------
    def _apply_opaque(self, model: nn.Module) -> int:
        candidates = {}
        for where, gm in graph_modules(model):
            for n in gm.graph.nodes:
                if n.op != "call_module":
                    continue
                m = gm.get_submodule(n.target)
                if is_neuron(m) or isinstance(m, InterceptedAttention) or type(m).__module__.startswith("torch.nn"):
                    continue
                if type(m).__module__.startswith("brevitas") or isinstance(m, (AttentionMapNeuron, AttentionScale)):
                    continue
                candidates[f"{where}.{n.target}" if where else n.target] = m
        if not candidates or self.ctx.example_input is None:
            return 0
        rec = record_calls(model, candidates, self.ctx.example_input)
        inputs, calls = rec.args, rec.counts
        count = 0
        for qualname, module in candidates.items():
            if qualname not in inputs:
                continue
            chains, has_softmax = probe_attention(module, inputs[qualname])
            if not chains:
                continue
            if has_softmax and self.softmax != "replace":
                raise ModelError(f"attention in '{qualname}' uses softmax, which a binary spiking map cannot "
                                 "reproduce; set attention.softmax: replace to swap it for the spiking map.")
            self._per_step = self._is_per_step(calls.get(qualname, 1))
            heads, T, merged = self._probe_layout(module, inputs[qualname])
            scale = self._map_scale(T, heads, merged) if self.learnable_scale else nn.Identity()
            wrapped = InterceptedAttention(module, self._map_neuron(T, merged), scale, softmax=self.softmax)
            parent, _, attr = qualname.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, wrapped)
            note = "" if self.map == "auto" else f" (attention.map={self.map} cannot re-associate an untraced block)"
            self.ctx.note(f"BinarizeAttention: '{qualname}' could not be traced; its matmuls are intercepted{note}")
            self.binarized.append(f"{qualname}:intercepted")
            count += 1
        return count

    def _probe_layout(self, module: nn.Module, args: tuple) -> tuple[int, int, bool]:
        shapes = []

        class Grab(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, a=(), kw=None):
                out = func(*a, **(kw or {}))
                if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm) and not shapes:
                    shapes.append(tuple(out.shape))
                return out

        with torch.no_grad(), Grab():
            module(*args)
        T, heads, merged = self._layout(shapes[0] if shapes else None)
        return heads, T, merged

    # -- entry point ------------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        self.binarized = []
        gms = graph_modules(model)
        calls = propagate_shapes(model, self.ctx.example_input) if self.ctx.example_input is not None and gms else {}
        count = 0
        for name, gm in gms:
            self._per_step = self._is_per_step(calls.get(name, 1))
            count += self._apply_graph(gm)
        count += self._apply_opaque(model)
        self._per_step = False
        already = sum(isinstance(m, AttentionMapNeuron) for m in model.modules())
        if not count and not already:
            self.ctx.note("BinarizeAttention: no activation×activation matmul found (Hadamard-style or "
                          "matmul-free attention is already binary); attention left alone.")
        elif count:
            self.ctx.note(f"BinarizeAttention: {count} attention map(s) binarized ({', '.join(self.binarized)})")
        return model

    def check(self, model: nn.Module) -> None:
        for where, gm in graph_modules(model):
            for chain in find_attention_chains(gm):
                if not _already_binary(gm, chain):
                    raise PassError(f"BinarizeAttention: chain at node '{chain.mm2.name}' in "
                                    f"'{where or '<root>'}' has no map neuron.")
