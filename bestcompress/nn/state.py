"""One reset for every neuron state bestcompress produces or keeps.

bestcompress's multi-step neurons keep no state between calls, and a membrane that a model passes around
itself (snnTorch `spk, mem = lif(x, mem)`) is never stored. What remains is state a model means to keep
between calls: single-step neurons (bestcompress LIF/IF/ParametricLIF with step_mode='s', the per-step
attention map neuron and its step counter), bestcompress Leaky with init_hidden=True, and the third-party neurons
CanonicalizeNeurons keeps (spikingjelly, snnTorch, sinabs; norse modules take their state as an argument and
keep none). `reset_state(model)` clears all of them; the trainer calls it before every batch.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.fx.node import has_side_effect


def _library(m: nn.Module) -> str:
    return type(m).__module__.split(".")[0]


def _reset_snntorch(m: nn.Module) -> None:
    # snntorch.utils.reset walks a class-level registry; reset_mem() on the instance clears the same state.
    if hasattr(m, "reset_mem"):
        m.reset_mem()
    for name in ("mem", "syn", "spk"):
        value = getattr(m, name, None)
        if isinstance(value, torch.Tensor):
            setattr(m, name, torch.zeros_like(value).detach())


def _resetter(m: nn.Module):
    """The call that clears `m`'s state, or None when `m` keeps none."""
    from .leaky import Leaky
    from .lif import LIF
    if isinstance(m, (LIF, Leaky)) or getattr(m, "bc_stateful", False):
        return m.reset
    lib = _library(m)
    if lib == "spikingjelly" and callable(getattr(m, "reset", None)) and hasattr(m, "v"):
        return m.reset  # MemoryModule (activation_based) and the legacy clock_driven nodes
    if lib == "snntorch":
        try:
            import snntorch
        except Exception:  # pragma: no cover - a half-installed snntorch
            return None
        if isinstance(m, snntorch.SpikingNeuron):
            return lambda: _reset_snntorch(m)
    if lib == "sinabs" and callable(getattr(m, "reset_states", None)):
        return m.reset_states
    return None


def stateful_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module of `model` that holds neuron state between calls (see the module docstring)."""
    return [(n, m) for n, m in model.named_modules() if _resetter(m) is not None]


def has_state(model: nn.Module) -> bool:
    return any(_resetter(m) is not None for m in model.modules())


def reset_state(model: nn.Module) -> None:
    """Put every neuron of `model` at rest (bestcompress, spikingjelly, snnTorch and sinabs neurons alike)."""
    for m in model.modules():
        fn = _resetter(m)
        if fn is not None:
            fn()


# Methods a forward calls on its neurons to start their state afresh (snnTorch's init_* / reset_mem,
# spikingjelly and bestcompress reset, sinabs reset_states). The tracer records such a call as a graph node
# (`call_state_method`), so the traced model resets where the model did instead of only once at trace time.
STATE_METHODS = ("reset", "reset_mem", "init_leaky", "init_synaptic", "init_rleaky", "init_rsynaptic",
                 "init_alpha", "init_lapicque", "reset_states")


@has_side_effect
def call_state_method(module: nn.Module, method: str):
    """`module.<method>()` as a graph node (kept by dead-code elimination: it has a side effect)."""
    return getattr(module, method)()


@has_side_effect
def reset_module(module: nn.Module) -> None:
    """`reset_state(module)` as a graph node: a library reset a forward makes (snntorch.utils.reset(self),
    spikingjelly functional.reset_net(self)) is recorded as one of these per neuron by the tracer."""
    reset_state(module)


# Library functions a forward may call to reset its own neurons, as (module, function name).
LIBRARY_RESETS = (("snntorch.utils", "reset"), ("spikingjelly.activation_based.functional", "reset_net"))


def forward_batches(model: nn.Module, batches: Iterable[torch.Tensor], reset: Callable[[], None] | None,
                    hooks=()) -> int:
    """Run the model in eval mode without gradients over the batches (the `hooks` the caller registered record
    what they need; they are removed at the end, also on an error), calling `reset` (e.g. a model's state reset)
    after each; returns how many batches ran."""
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                seen += 1
                if reset is not None:
                    reset()
    finally:
        for h in hooks:
            h.remove()
    return seen
