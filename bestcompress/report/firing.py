"""Firing rate of every spiking neuron of a model, measured with forward hooks on a few batches of real input."""
from __future__ import annotations

import torch
from torch import nn

from ..trace import is_neuron


def _spikes(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]  # snnTorch returns (spk, mem)
    return None


def firing_rates(model: nn.Module, batches) -> dict[str, float]:
    """Mean output (spikes per neuron per time step) of each neuron module, over all `batches`, in call order.

    Args:
        model: a spiking model.
        batches: an iterable of input tensors the model accepts.
    Returns:
        {module name: firing rate in [0, 1]}; neurons never called are left out.
    """
    sums: dict[str, list[float]] = {}
    handles = []

    def hook(name):
        def fn(mod, args, out):
            s = _spikes(out)
            if s is not None and s.numel():
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += float(s.detach().float().sum())
                acc[1] += s.numel()
        return fn

    for name, m in model.named_modules():
        if name and is_neuron(m):
            handles.append(m.register_forward_hook(hook(name)))
    from ..nn.state import has_state, reset_state
    stateful = has_state(model)  # neurons that keep a membrane between calls start each batch at rest
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                if stateful:
                    reset_state(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: s / n for name, (s, n) in sums.items() if n}
