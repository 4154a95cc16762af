"""Compile a binary model into the engine's form: packed layers in place of the binary ones, popcount matmuls.

The model keeps its own graph (a torch.fx GraphModule, or an eager root with traced children): every binary
Conv1d/Conv2d/Linear module becomes a PackedLinear/PackedConv holding only sign bits, and every matmul node of
every graph becomes `popcount_matmul`. Neurons, normalizations, the full-precision first layer and heads and
couplings stay the model's own torch ops, so spikes are computed by the same code as in PyTorch; max pooling
becomes separable maxima of strided views (exact, and faster than torch's max_pool2d with its indices).
A BatchNorm (eval mode) right after a packed layer is folded into the kernel's epilogue when the fold is exact:
the epilogue repeats PyTorch's own BatchNorm arithmetic for the layout it would see (contiguous: fma(y, α, β) with
α = rsqrt(var + ε)·γ; transposed views, as Spikformer's Linear → transpose → BN1d → transpose: ((y − μ)·(1/√(var+ε)))·γ
+ β, or for a channel-last BatchNorm1d such as nn.fast_norm's, fma(y, α, β − μ·α)), and each fold is checked bit for
bit against the BatchNorm module on a probe before it is kept.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..nn.binary import BinaryLinear, is_binary_layer
from .kernels import apply_bn
from .layers import PackedConv, PackedLinear, _PackedLayer, popcount_matmul
from .pooling import SeparableMaxPool2d

_MATMULS = (operator.matmul, torch.matmul)


@dataclass
class Plan:
    """What compile_model did: packed layers, layers kept in PyTorch (with why), rewritten matmuls."""

    packed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    matmuls: int = 0
    folded: list[str] = field(default_factory=list)
    pools: int = 0


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _rewrite_matmuls(gm: fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _MATMULS:
            node.target = popcount_matmul
            count += 1
        elif node.op == "call_method" and node.target == "matmul":
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(popcount_matmul, tuple(node.args), dict(node.kwargs))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
    if count:
        gm.recompile()
    return count


def _bn_params(bn: nn.modules.batchnorm._BatchNorm, mode: int) -> list[torch.Tensor]:
    var, mean = bn.running_var.to(torch.float32), bn.running_mean.to(torch.float32)
    w = bn.weight if bn.weight is not None else torch.ones_like(var)
    b = bn.bias if bn.bias is not None else torch.zeros_like(var)
    w, b = w.detach().to(torch.float32), b.detach().to(torch.float32)
    if mode == 1:
        alpha = torch.rsqrt(var + bn.eps) * w
        beta = (b.double() - mean.double() * alpha.double()).to(torch.float32)  # fma(-μ, α, β)
        return [alpha, beta]
    return [mean, 1 / torch.sqrt(var + bn.eps), w, b]


def _fold_is_exact(bn, mode: int, params, channels: int, layer: _PackedLayer, transposed: bool) -> bool:
    """Does the epilogue reproduce `bn` bit for bit on a probe in the layout it will see?"""
    g = torch.Generator().manual_seed(0)
    if transposed:  # [rows, tokens, C] viewed as [rows, C, tokens]
        probe = torch.randint(-600, 600, (3, 5, channels), generator=g).to(torch.float32) * 0.25
        probe = probe + torch.randn(probe.shape, generator=g)
        ref = bn(probe.transpose(-1, -2)).transpose(-1, -2)
        return bool(torch.equal(ref, apply_bn(probe, (mode, params), -1)))
    dims = 2 if isinstance(layer, PackedLinear) else (layer.dims + 2)
    shape = (3, channels) + (5,) * (dims - 2)
    probe = torch.randint(-600, 600, shape, generator=g).to(torch.float32) * 0.25 + torch.randn(shape, generator=g)
    return bool(torch.equal(bn(probe), apply_bn(probe, (mode, params), 1)))


def _is_swap_last_two(node) -> bool:
    return (node.op == "call_method" and node.target == "transpose" and len(node.args) == 3
            and set(node.args[1:]) == {-1, -2} and not node.kwargs)


def _fold_batchnorms(gm: fx.GraphModule, plan: Plan) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _PackedLayer):
            continue
        layer = gm.get_submodule(node.target)
        if layer.bn is not None or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        chain, transposed = [], False
        if _is_swap_last_two(user) and isinstance(layer, PackedLinear) and len(user.users) == 1:
            chain, transposed = [user], True
            user = next(iter(user.users))
        if user.op != "call_module" or user.args[0] is not (chain[0] if chain else node) or len(user.args) != 1:
            continue
        bn = gm.get_submodule(user.target)
        if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None
                or bn.num_features != layer.out_features):
            continue
        last = user
        if transposed:
            if len(user.users) != 1 or not _is_swap_last_two(next(iter(user.users))):
                continue
            last = next(iter(user.users))
        # transposed: nn.BatchNorm1d's own arithmetic on that layout (mode 2), else one fma per output with the
        # shift rounded as a channel-last BatchNorm computes it (bias - mean * scale: ChannelLastBatchNorm1d's
        # addcmul, an fma on CPU) or as one fma; the first that the probe shows bit-exact is kept
        alpha, beta = _bn_params(bn, 1)
        candidates = [(1, [alpha, beta])]
        if transposed:
            mean = bn.running_mean.to(torch.float32)
            b = bn.bias.detach().to(torch.float32) if bn.bias is not None else torch.zeros_like(mean)
            candidates = [(2, _bn_params(bn, 2)), (1, [alpha, b - mean * alpha])] + candidates
        with torch.no_grad():
            found = next(((m, p) for m, p in candidates
                          if _fold_is_exact(bn, m, p, layer.out_features, layer, transposed)), None)
        if found is None:
            continue
        mode, params = found
        layer.fold_bn(mode, params)
        layer.bn_transposed = transposed  # the BatchNorm saw the output through a transpose (benchmarks rebuild it)
        last.replace_all_uses_with(node)
        for dead in ([last, user] if transposed else [user]) + chain:
            gm.graph.erase_node(dead)
        plan.folded.append(f"{node.target} + {user.target}")
    gm.graph.lint()
    gm.recompile()


def compile_model(model: nn.Module, copy_model: bool = True, fold_bn: bool = True) -> tuple[nn.Module, Plan]:
    """The engine form of a binary model (eval mode, no gradients needed).

    Args:
        model: a binary model (from binarize, bc.load or load_packed).
        copy_model: work on a deep copy (the caller's model is left as it is).
        fold_bn: fold BatchNorms into the packed layers' epilogues where that is bit-exact.
    Returns:
        (engine model, plan).
    """
    if copy_model:
        model = copy.deepcopy(model)
    model.eval()
    plan = Plan()
    for name, layer in list(model.named_modules()):
        if not is_binary_layer(layer):
            continue
        try:
            new = PackedLinear(layer) if isinstance(layer, BinaryLinear) else PackedConv(layer)
        except ValueError as e:
            plan.kept[name] = str(e)
            continue
        _set_module(model, name, new)
        plan.packed.append(name)
    for name, pool in list(model.named_modules()):
        if SeparableMaxPool2d.supports(pool):
            _set_module(model, name, SeparableMaxPool2d(pool))
            plan.pools += 1
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        plan.matmuls += _rewrite_matmuls(gm)
        if fold_bn:
            _fold_batchnorms(gm, plan)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, plan
