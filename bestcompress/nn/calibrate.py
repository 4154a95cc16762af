"""BatchNorm recalibration: re-estimate the running statistics of a (binary) network on a few batches.

Binarizing the weights changes the scale and offset of every convolution's output, so the BatchNorm statistics
learnt for the full-precision weights no longer fit and most neurons stop firing (or fire everywhere): the binary
model is near chance before training. `recalibrate_batchnorm` re-estimates them on real inputs, which makes the
binary model usable at once. `make_it_fire` uses the same mechanism on random inputs, for checks on freshly
initialised networks.

`calibrate_attention_scales` does the same for the binary attention maps: the map neuron turns a real-valued map
M (Q·Kᵀ or Kᵀ·V of the model's own spikes) into a {0, 1} map B, so the product with the third operand loses M's
magnitude; no BatchNorm sits between it and the next neuron to absorb that. Each map's learnable scale λ (one per
time step and head, nn/attention.py AttentionScale) is set to the ratio of the masses,

    λ[t, h] = Σ M[t, :, h] / Σ B[t, :, h]        (sums over the batch and both map axes; λ stays 1 where B is 0)

so that λ·B carries the real map's mass: the product λ·B·V then has the mean of M·V, and the neuron after it fires
at about the rate it fired before binarization. (On MNIST-1D `spikformer_seq` this lifts a model whose only
change is binary attention maps from 80 % to 95 % = its full-precision accuracy, before any training.)
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .state import forward_batches


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor],
                          reset: Callable[[], None] | None = None) -> int:
    """Replace every BatchNorm's running mean and variance by their average over `batches`.

    Everything but the BatchNorm layers runs in eval mode (no dropout, dual heads averaged); the BatchNorms
    normalise with batch statistics and accumulate a cumulative average (momentum None, restored afterwards).
    No gradient is computed and no weight changes: only the running statistics and batch counters.

    Args:
        model: the model, calibrated in place; left in eval mode.
        batches: model inputs (already encoded and on the model's device).
        reset: clears stateful neurons between batches (third-party neurons keep their membrane between calls).
    Returns:
        The number of samples seen (0 when `batches` was empty: the statistics are then left as they were).
    """
    bns = batchnorms(model)
    model.eval()
    if not bns:
        return 0
    saved = [(bn.momentum, bn.running_mean.clone() if bn.running_mean is not None else None,
              bn.running_var.clone() if bn.running_var is not None else None,
              bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    seen = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                seen += int(x.shape[0])
                if reset is not None:
                    reset()
    finally:
        for bn, (momentum, mean, var, count) in zip(bns, saved):
            bn.momentum = momentum
            if seen == 0 and mean is not None:  # nothing seen: keep the old statistics
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
        model.eval()
    return seen


def attention_map_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(AttentionScale, AttentionMapNeuron) pairs of a traced binary model: each scale with the map neuron whose
    map it multiplies (the nearest map neuron upstream of the scale in the graph). Per-step scales (models with a
    Python time loop) and scales without a map neuron upstream are left out."""
    from torch import fx

    from .attention import AttentionMapNeuron, AttentionScale, StepAttentionScale
    pairs = []
    for gm in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        mods = dict(gm.named_modules())
        for n in gm.graph.nodes:
            scale = mods.get(n.target) if n.op == "call_module" else None
            if not isinstance(scale, AttentionScale) or isinstance(scale, StepAttentionScale):
                continue
            frontier, seen, found = list(n.all_input_nodes), set(), None
            while frontier and found is None and len(seen) < 64:
                a = frontier.pop(0)
                if a in seen:
                    continue
                seen.add(a)
                m = mods.get(a.target) if a.op == "call_module" else None
                if isinstance(m, AttentionMapNeuron):
                    found = m
                else:
                    frontier += a.all_input_nodes
            if found is not None:
                pairs.append((scale, found))
    return pairs


def calibrate_attention_scales(model: nn.Module, batches: Iterable[torch.Tensor],
                               reset: Callable[[], None] | None = None) -> int:
    """Set every binary attention map's λ to the mass ratio of the real and the binary map (module docstring).

    Runs `model` in eval mode without gradients on `batches`; only the λ of AttentionScale modules change.

    Args:
        model: a traced binary model (GraphModule), calibrated in place; left in eval mode.
        batches: model inputs (already encoded and on the model's device).
        reset: clears stateful neurons between batches.
    Returns:
        The number of scales set (0 when the model has none or `batches` was empty).
    """
    pairs = attention_map_pairs(model)
    if not pairs:
        return 0
    sums: dict[int, list] = {id(scale): [0.0, 0.0] for scale, _ in pairs}

    def hook(scale):
        def record(_mod, args, out):
            x = args[0]
            shape = (scale.time_steps, -1, scale.heads) + tuple(x.shape[-2:])
            acc = sums[id(scale)]
            acc[0] = acc[0] + x.detach().reshape(shape).double().sum((1, 3, 4))
            acc[1] = acc[1] + out.detach().reshape(shape).double().sum((1, 3, 4))
        return record

    handles = [neuron.register_forward_hook(hook(scale)) for scale, neuron in pairs]
    if forward_batches(model, batches, reset, handles) == 0:
        return 0
    done = 0
    for scale, _ in pairs:
        mass, count = sums[id(scale)]
        if not torch.is_tensor(count):
            continue
        lam = torch.where(count > 0, mass / count.clamp_min(1e-12), torch.ones_like(mass))
        with torch.no_grad():
            scale.lam.copy_(lam.reshape(scale.lam.shape).to(scale.lam))
        done += 1
    return done


def make_it_fire(model: nn.Module, input_shape, batches: int = 1) -> nn.Module:
    """Make a freshly initialised network fire: every BatchNorm gets weight 2 and bias 0.5 and statistics
    re-estimated on seeded random inputs (and quantized coupled streams their power-of-two grids, then the
    statistics again), so that roughly a fifth of the neurons fire (a freshly initialised
    network is silent, which makes checks on its spikes vacuous).

    Args:
        model: the model to calibrate in place.
        input_shape: per-sample input shape.
        batches: calibration batches of 8 random samples.
    Returns:
        `model`, in eval mode.
    """
    for bn in batchnorms(model):
        if bn.affine:
            with torch.no_grad():
                bn.weight.fill_(2.0)
                bn.bias.fill_(0.5)

    def seeded_inputs():  # the same random batches for every pass
        g = torch.Generator().manual_seed(0)
        return (torch.rand((8,) + tuple(input_shape), generator=g) for _ in range(batches))

    recalibrate_batchnorm(model, seeded_inputs())
    from .stream_quant import calibrate_stream_scales
    if calibrate_stream_scales(model, seeded_inputs()):  # quantized coupled streams (reversible.stream_bits)
        recalibrate_batchnorm(model, seeded_inputs())
    return model
