"""Memory-saving backprop for the training forward (recipe `train.memory: plain | checkpoint | reversible`).

- `plain`: autograd keeps every activation its backward needs; spike tensors among them are stored as bits
  (nn/memory.py), as in every mode.
- `checkpoint`: the forward is cut into segments at the trunk's streams z_0, z_1, ..., z_K (the residual
  sub-blocks found by `trunk.find_stages`, or the couplings of a coupled model) and at every neuron's output
  (inside the tokenizer and the sub-blocks: a segment that starts at spikes keeps its input as bits). Each
  segment runs under `torch.utils.checkpoint` (use_reentrant=False): only its inputs are kept, and its inside is
  recomputed during backward, one segment at a time (peak: the saved inputs plus one segment's inside). The
  recomputation is exact: the random state is replayed, neuron state that a model keeps between calls
  (single-step neurons, nn/state.py) is put back to what it was when the segment first ran and restored
  afterwards, and BatchNorm running statistics are not updated twice. Gradients equal plain autograd's and
  recomputed spikes equal the forward's. A model without a trunk is cut at its neurons alone.
- `reversible`: coupled stages rebuild each sub-block's input from its outputs (training/reversible.py);
  the rest as `checkpoint`.

A model that is not one traced graph is traced for this (modules shared, nothing changed in the model); one that
cannot be traced, or has neither a trunk nor neurons, trains with plain autograd and the run log says so once.
`memory_net(model, mode, say)` returns the module the training forward calls (the model's parameters are its
parameters; DDP may wrap it); evaluation and checkpoints use the model itself.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..nn.memory import packed_spikes
from .segments import checkpointed_runner, trace_for_memory

MODES = ("plain", "checkpoint", "reversible")


# ------------------------------------------------------------------------------------------------ the switch

class MemoryNet(nn.Module):
    """The training forward of `model` under a memory mode; `model` is its only child (same parameters)."""

    def __init__(self, model: nn.Module, runner: Callable | None, mode: str, pack: bool = True,
                 say: Callable = print) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "runner", runner)
        object.__setattr__(self, "say", say)
        self.mode = mode
        self.pack = pack
        self._told = False

    def forward(self, *args):
        with packed_spikes(self.pack and torch.is_grad_enabled()):
            if self.runner is None or "forward" in vars(self.model):
                if self.runner is not None and not self._told:
                    self._told = True
                    self.say(f"train.memory={self.mode}: the feature taps run this model's forward themselves; "
                             "training with plain autograd")
                return self.model(*args)
            # through the model's own __call__, so that hooks on it (the feature taps') run as they would
            vars(self.model)["forward"] = self.runner
            try:
                return self.model(*args)
            finally:
                del vars(self.model)["forward"]


def memory_net(model: nn.Module, mode: str = "plain", say: Callable = print, pack: bool = True) -> MemoryNet:
    """The module a training step calls for `mode` (module docstring); says once when it falls back."""
    if mode not in MODES:
        raise ValueError(f"train.memory must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "plain":
        return MemoryNet(model, None, mode, pack, say)
    if mode == "reversible":
        from .reversible import reversible_runner
        try:
            runner = reversible_runner(model, say)
        except Exception as e:  # untraceable: as checkpoint would be
            say(f"train.memory=reversible: cannot rebuild '{type(model).__name__}' ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}); using checkpoints instead")
            runner = None
        if runner is not None:
            return MemoryNet(model, runner, mode, pack, say)
        mode = "checkpoint"
    try:
        gm = trace_for_memory(model)
        runner, segments = checkpointed_runner(gm, model)
    except Exception as e:  # untraceable or no trunk: plain autograd, said once
        say(f"train.memory=checkpoint: cannot cut '{type(model).__name__}' into sub-blocks "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); training with plain autograd")
        return MemoryNet(model, None, "plain", pack, say)
    say(f"train.memory=checkpoint: {len(segments)} segments (cut at the trunk's streams and the neurons' spikes) "
        "recomputed in backward")
    return MemoryNet(model, runner, mode, pack, say)
