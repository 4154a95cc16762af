"""train.memory=reversible: coupled trunks rebuild each sub-block's input from its outputs during backward.

For a coupled stage z_k = F_k(z_{k-1}) + a_k·z_{k-2} + b_k·z_{k-1} (k = 2..K; nn/reversible.py), the forward runs
without recording a graph and keeps only a few exact streams; backward walks k = K..2, recomputes F_k(z_{k-1})
with a graph, rebuilds z_{k-2} = (z_k − F_k(z_{k-1}) − b_k·z_{k-1}) / a_k, and back-propagates through that one
sub-block (RevViT / RevSNN style). Drift control:

- the inverse multiplies rounding errors by 1/|a_k| (2 for the paper's ½): exact streams (z_{j-1}, z_j) are kept
  wherever the product of 1/|a_k| since the last kept pair would exceed GAIN_LIMIT, so a rebuilt stream is never
  more than 16× a float's rounding away from the forward's. A coupling with a_k ≈ 0 (the `preserving` form at its
  start: a plain residual, not invertible) keeps its input instead of rebuilding it (a checkpoint) — said once in
  the run log;
- every neuron's spikes in F_k are logged as bits in the forward; the recomputation's spikes are compared with them
  and, when one differs, the streams are recomputed exactly from the last kept pair below (a forward of at most a
  few sub-blocks) before the sub-block is back-propagated, so recomputed spikes always equal the forward's.

Gradients equal plain autograd's within float rounding (tests: 1e-5 relative). Everything outside the coupled
stages (tokenizer, F_1, heads) runs as `checkpoint` does. A model keeping neuron state between calls, a stage whose
inner tensors are used outside it, or a forward with feature taps on the couplings (hooks or a torch function mode,
which would see tensors without a graph) runs that forward as `checkpoint` and says so once.
"""
from __future__ import annotations

import contextlib
import math
import operator
from typing import Callable

import torch
from torch import fx, nn

from ..errors import ModelError
from ..nn.memory import pack_bits, spike_log
from ..nn.reversible import MIN_INVERTIBLE, ReversibleCoupling

GAIN_LIMIT = 16.0


def _params(mods) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in mods:
        for p in m.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _buffers(mod: nn.Module) -> list[torch.Tensor]:
    return list({id(b): b for b in mod.buffers()}.values())


class _Chain:
    """One coupled stage: F_2..F_K (GraphModules sharing the model's modules) and their couplings."""

    def __init__(self, fs: list[fx.GraphModule], couplings: list[ReversibleCoupling], stage: int) -> None:
        self.fs, self.couplings, self.stage = fs, couplings, stage
        self.params = _params(list(fs) + list(couplings))
        index = {id(p): i for i, p in enumerate(self.params)}
        self.param_ids = [[index[id(p)] for p in _params([f, c])] for f, c in zip(fs, couplings)]
        self.buffers = [_buffers(f) for f in fs]
        self.exact_recomputes = 0  # how often a rebuilt stream flipped a spike and was recomputed exactly

    @property
    def K(self) -> int:
        return len(self.fs) + 1

    def kept(self) -> tuple[set[int], list[int]]:
        """(indices of the streams kept exactly, k of the couplings whose a_k is ~0), from the current a_k."""
        keep, gain, flat = {0, 1, self.K - 1, self.K}, 1.0, []
        for k in range(self.K, 1, -1):
            a = abs(self.couplings[k - 2].coefficients()[0])
            if a < MIN_INVERTIBLE:
                flat.append(k)
                gain = math.inf
            else:
                gain *= max(1.0, 1.0 / a)
            if gain > GAIN_LIMIT:  # z_{k-2} is kept instead of rebuilt
                keep.update((k - 2, k - 1))
                gain = 1.0
        return keep, sorted(flat)

    def step(self, k: int, z_km2: torch.Tensor, z_km1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.fs[k - 2](z_km1)
        return f, self.couplings[k - 2](f, z_km2, z_km1)


class _Restore:
    """Puts buffers (BatchNorm statistics) back after a recomputation."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.buffers, self.kept = buffers, []

    def __enter__(self):
        self.kept = [b.clone() for b in self.buffers]
        return self

    def __exit__(self, *exc):
        for b, c in zip(self.buffers, self.kept):
            b.data.copy_(c)  # through .data: BatchNorm's backward holds its buffers and checks their version


def _capture(device: torch.device) -> tuple:
    """What a recomputation must replay: the random state (CPU, and the GPU's) and the autocast setting."""
    kind = device.type if device.type in ("cuda", "cpu") else "cpu"
    gpu = torch.cuda.get_rng_state(device) if kind == "cuda" else None
    return torch.get_rng_state(), gpu, kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), device


def _recompute(chain: _Chain, k: int, z_km2, z_km1, rng, log=None, grad: bool = False):
    """F_k and z_k again, with the forward's random state, buffers restored; `log` checks the spikes."""
    mismatch = [False]
    pos = [0]

    def check(t):
        if log is not None:
            same = pos[0] < len(log) and torch.equal(pack_bits(t.detach()).bits, log[pos[0]])
            mismatch[0] |= not same
            pos[0] += 1

    cpu, gpu, kind, amp, amp_dtype, device = rng
    with _Restore(chain.buffers[k - 2]), torch.random.fork_rng(devices=[device] if gpu is not None else []), \
            spike_log(check), torch.set_grad_enabled(grad), torch.autocast(kind, dtype=amp_dtype, enabled=amp):
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu, device)
        if z_km2 is None:  # backward needs F_k alone (z_{k-2} is rebuilt from it)
            f, z_k = chain.fs[k - 2](z_km1), None
        else:
            f, z_k = chain.step(k, z_km2, z_km1)
    if log is not None and pos[0] != len(log):
        mismatch[0] = True
    return f, z_k, mismatch[0]


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain: _Chain, z0, z1, *params):
        keep, _ = chain.kept()
        zs, logs, rngs = {0: z0, 1: z1}, [], []
        with torch.no_grad():
            for k in range(2, chain.K + 1):
                log: list = []
                rngs.append(_capture(z1.device))
                with spike_log(lambda t: log.append(pack_bits(t.detach()).bits)):
                    _, zs[k] = chain.step(k, zs[k - 2], zs[k - 1])
                logs.append(log)
                for i in [i for i in zs if i < k - 1 and i not in keep]:
                    del zs[i]
        order = sorted(keep)
        ctx.chain, ctx.order, ctx.rngs = chain, order, rngs
        ctx.sizes = [len(log) for log in logs]
        ctx.save_for_backward(*[zs[i] for i in order], *[b for log in logs for b in log])
        out_km1 = zs[chain.K - 1]
        return (out_km1.clone() if chain.K - 1 == 1 else out_km1), zs[chain.K]

    @staticmethod
    def backward(ctx, g_km1, g_k):
        chain, order = ctx.chain, ctx.order
        saved = ctx.saved_tensors
        exact = dict(zip(order, saved[:len(order)]))
        flat_logs, logs, at = saved[len(order):], [], 0
        for n in ctx.sizes:
            logs.append(list(flat_logs[at:at + n]))
            at += n
        K = chain.K
        z = {K: exact[K], K - 1: exact[K - 1]}
        g = {K: g_k if g_k is not None else torch.zeros_like(z[K]),
             K - 1: g_km1 if g_km1 is not None else torch.zeros_like(z[K - 1])}
        pgrads: list = [None] * len(chain.params)
        for k in range(K, 1, -1):
            zk1 = z[k - 1].detach().requires_grad_(True)
            with torch.enable_grad():
                f, _, bad = _recompute(chain, k, None, zk1, ctx.rngs[k - 2], logs[k - 2], grad=True)
            if bad:  # a rebuilt z_{k-1} flipped a spike: recompute the streams exactly from the last kept pair
                chain.exact_recomputes += 1
                z.update(_exact_streams(chain, exact, ctx.rngs, k - 1))
                zk1 = z[k - 1].detach().requires_grad_(True)
                with torch.enable_grad():
                    f, _, bad = _recompute(chain, k, None, zk1, ctx.rngs[k - 2], logs[k - 2], grad=True)
                if bad:
                    raise RuntimeError(f"train.memory=reversible: sub-block {k} does not recompute the spikes of "
                                       "its forward from exact inputs (is the model deterministic?)")
            coupling = chain.couplings[k - 2]
            if k - 2 in exact:
                z_km2 = exact[k - 2]
            elif k - 2 in z:  # rebuilt exactly by _exact_streams
                z_km2 = z[k - 2]
            else:
                a, b = coupling.coefficients()
                z_km2 = rebuild(z[k], z[k - 1], f.detach(), a, b)
            zk2 = z_km2.detach().requires_grad_(True)
            ids = chain.param_ids[k - 2]
            with torch.enable_grad():
                out = coupling(f, zk2, zk1)
                got = torch.autograd.grad(out, [zk1, zk2] + [chain.params[i] for i in ids], g[k],
                                          allow_unused=True)
            for i, gp in zip(ids, got[2:]):
                if gp is not None:
                    pgrads[i] = gp if pgrads[i] is None else pgrads[i] + gp
            g[k - 1] = g[k - 1] + got[0] if got[0] is not None else g[k - 1]
            g[k - 2] = got[1] if got[1] is not None else torch.zeros_like(z_km2)
            z[k - 2] = z_km2
            del z[k], g[k]
        return (None, g[0], g[1], *pgrads)


def rebuild(z_k: torch.Tensor, z_km1: torch.Tensor, f_k: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """z_{k-2} from a coupling's output (nn/reversible.py's inverse)."""
    return (z_k - f_k - b * z_km1) / a


def _exact_streams(chain: _Chain, exact: dict, rngs: list, upto: int) -> dict:
    """z_{i-1}..z_upto recomputed (no graph) from the highest kept pair (z_{i-1}, z_i) with i <= upto."""
    i = max(j for j in exact if j <= upto and j - 1 in exact)
    zs = {i - 1: exact[i - 1], i: exact[i]}
    for k in range(i + 1, upto + 1):
        _, zs[k], _ = _recompute(chain, k, zs[k - 2], zs[k - 1], rngs[k - 2])
    return zs


class ReversibleStage(nn.Module):
    """(z_0, z_1) -> (z_{K-1}, z_K) of one coupled stage, reversibly when it can (module docstring)."""

    def __init__(self, chain: _Chain, say: Callable) -> None:
        super().__init__()
        object.__setattr__(self, "chain", chain)
        object.__setattr__(self, "say", say)
        self._told: set[str] = set()

    def _tell(self, key: str, text: str) -> None:
        if key not in self._told:
            self._told.add(key)
            self.say(text)

    def _plain_reason(self) -> str | None:
        if not torch.is_grad_enabled():
            return "no gradient"
        if any(c._forward_hooks or c._forward_pre_hooks for c in self.chain.couplings):
            return "hooks on the couplings (feature taps)"
        if torch._C._is_torch_function_mode_enabled():
            return "a torch function mode (attention taps)"
        return None

    def forward(self, z0, z1):
        chain = self.chain
        why = self._plain_reason()
        if why is not None:
            if why != "no gradient":
                self._tell("plain", f"train.memory=reversible: stage {chain.stage} runs with checkpoints ({why})")
            zs = [z0, z1]
            for k in range(2, chain.K + 1):
                if not torch.is_grad_enabled():
                    zs.append(chain.step(k, zs[-2], zs[-1])[1])
                    continue
                zs.append(torch.utils.checkpoint.checkpoint(
                    lambda a, b, k=k: chain.step(k, a, b)[1], zs[-2], zs[-1], use_reentrant=False,
                    context_fn=lambda k=k: (contextlib.nullcontext(), _Restore(chain.buffers[k - 2]))))
            return zs[-2], zs[-1]
        _, flat = chain.kept()
        if flat:
            self._tell("flat", f"train.memory=reversible: stage {chain.stage}, couplings k={flat} have a_k = 0 "
                               "(plain residuals, not invertible): their inputs are kept (checkpoints) instead of "
                               "rebuilt")
        return _Reversible.apply(chain, z0, z1, *chain.params)


# ------------------------------------------------------------------------------------------------ the runner

def _stage_chain(gm: fx.GraphModule, stage: int) -> tuple[_Chain, list[fx.Node], set[fx.Node]]:
    """The chain of `stage`, its streams [z_0..z_K] and the nodes it replaces; ModelError when it cannot."""
    from ..passes.reversible import coupling_nodes, subblock_functions
    nodes = coupling_nodes(gm, stage)
    streams = [nodes[0].args[1], nodes[0].args[2]] + nodes
    for k, n in enumerate(nodes, start=2):
        if n.args[1] is not streams[k - 2] or n.args[2] is not streams[k - 1]:
            raise ModelError(f"coupling {k} of stage {stage} does not take z_{k - 2} and z_{k - 1}")
    fs = subblock_functions(gm, stage)[1:]
    order = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    region = set(order[pos[streams[1]] + 1:pos[streams[-1]] + 1])
    for n in region:
        if n in (streams[-1], streams[-2]):
            continue
        outside = [u for u in n.users if u not in region]
        if outside:
            raise ModelError(f"'{n.name}' inside stage {stage} is used outside it ('{outside[0].name}')")
    couplings = [gm.get_submodule(n.target) for n in nodes]
    return _Chain(fs, couplings, stage), streams, region


def reversible_runner(model: nn.Module, say: Callable):
    """The training forward of a coupled model with its coupled stages reversible and the rest checkpointed;
    None (with one line said) when the model has no usable coupled stage."""
    from .segments import checkpointed_runner, state_keepers, trace_for_memory
    from ..nn.lif import LIF
    if state_keepers(model):
        say("train.memory=reversible: the model keeps neuron state between calls; using checkpoints instead")
        return None
    gm = trace_for_memory(model)
    stages = sorted({m.stage for m in gm.modules() if isinstance(m, ReversibleCoupling)})
    if not stages:
        say("train.memory=reversible: the model has no reversible couplings; using checkpoints instead")
        return None
    found = []
    for s in stages:
        try:
            found.append(_stage_chain(gm, s))
        except (ModelError, ValueError) as e:
            say(f"train.memory=reversible: stage {s} stays checkpointed ({e})")
    if not found:
        return None
    graph, env, root = fx.Graph(), {}, {}
    replaced = {n: i for i, (_, _, region) in enumerate(found) for n in region}
    calls: dict[int, fx.Node] = {}
    for n in gm.graph.nodes:
        i = replaced.get(n)
        if i is None:
            env[n] = graph.node_copy(n, lambda a: env[a])
            if n.op in ("call_module", "get_attr"):
                root[n.target] = _resolve(gm, n.target)
            continue
        chain, streams, _ = found[i]
        if i not in calls:
            name = f"reversible_stage_{chain.stage}"
            root[name] = ReversibleStage(chain, say)
            calls[i] = graph.call_module(name, (env[streams[0]], env[streams[1]]))
            env[streams[-2]] = graph.call_function(operator.getitem, (calls[i], 0))
            env[streams[-1]] = graph.call_function(operator.getitem, (calls[i], 1))
    gm2 = fx.GraphModule(root, graph, f"Reversible{type(gm).__name__}")
    keep = set(calls_in(gm2))
    lif_cuts = [n for n in gm2.graph.nodes if n.op == "call_module" and isinstance(gm2.get_submodule(n.target), LIF)]
    streams0 = [a for n in keep for a in n.args]
    runner, segments = checkpointed_runner(gm2, model, cuts=lif_cuts + list(keep) + streams0, keep=keep)
    say(f"train.memory=reversible: {len(found)} coupled stage(s) rebuilt in backward, {len(segments)} checkpointed "
        "segments around them")
    return runner


def calls_in(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                               ReversibleStage)]


def _resolve(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
