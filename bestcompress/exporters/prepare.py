"""An export-ready copy of a binary model: spikes as BipolarQuant thresholds, constant standardized weights, taps.

Three changes, all on a deep copy (the caller's model is never touched), none of which changes a single output bit:

- every LIF fires through a 1-bit Brevitas activation quantizer, s = 0.5·(bipolar(H − V_th) + 1). Brevitas exports
  any 1-bit quantizer as `BipolarQuant` (STACK.md), so the graph holds a threshold FINN turns into a
  MultiThreshold, and the spike is still exactly 0 or 1 (bipolar(x) = +1 for x >= 0, the Heaviside's
  convention). (A scale-½ quantizer, s = bipolar½(H − V_th) + ½, would spare FINN the ×0.5, but FINN+ 1.6.1
  converts it wrongly: its outputs then differ from PyTorch.);
- every binary layer's weight is replaced by its standardized weight Ŵ = (W − mean_c)/std_c, computed once in
  PyTorch, and quantizes it directly: the graph holds `Ŵ → BipolarQuant → Conv/MatMul` and computes the very
  same ±1 (or ±α_c) values as PyTorch, without re-deriving the per-channel statistics in another runtime;
- every neuron's output passes through a `SpikeTap` marker op that names the module, so the verifier can match
  graph tensors to PyTorch forward hooks after the exporter and qonnx have renamed everything.

The copy returns only the logits of the model's output (`verify.logits_of`: a tensor; a tuple's first tensor,
Nones dropped; a dict's 'logits' or 'out'; per-time-step logits [T, B, K] averaged over T),
so `(logits, None)`, auxiliary and per-step outputs export as one tensor.
"""
from __future__ import annotations

import copy
import types

import torch
from torch import nn

from ..nn.binary import is_binary_layer, standardize_per_channel
from ..nn.lif import LIF
from ..trace import is_neuron
from .verify import logits_of

TAP_DOMAIN = "bestcompress"
TAP_OP = "SpikeTap"


class SpikeTap(torch.autograd.Function):
    """Identity in PyTorch; exported as `bestcompress::SpikeTap(name=<module path>)`, removed after export."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g, x, name: str):
        out = g.op(f"{TAP_DOMAIN}::{TAP_OP}", x, name_s=name)
        out.setType(x.type())  # same type and shape as its input (keeps the exporter's shape inference quiet)
        return out


def _bipolar_fire(self: LIF, h: torch.Tensor) -> torch.Tensor:
    return 0.5 * (self.bc_spike_quant(h - self.v_threshold) + 1.0)


def _constant_quant_weight(self, quant_input=None, subtensor_slice_list=None):
    return self.weight_quant(self.weight)


def _tapped_forward(forward, name: str):
    def run(*args, **kwargs):
        out = forward(*args, **kwargs)
        return SpikeTap.apply(out, name) if isinstance(out, torch.Tensor) else out
    return run


def neuron_paths(model: nn.Module) -> list[str]:
    """Qualified names of the spiking neurons of `model` (our LIF and other libraries' neurons)."""
    return [n for n, m in model.named_modules() if n and is_neuron(m)]


def binary_layer_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_binary_layer(m)]


def export_copy(model: nn.Module, bipolar_spikes: bool = True, taps: bool = True) -> nn.Module:
    """A deep copy of `model` in eval mode, prepared for the ONNX exporter (see the module docstring).

    Args:
        model: a binary model from `binarize` (or any model with LIF neurons / binary layers).
        bipolar_spikes: express LIF spikes through a Brevitas 1-bit quantizer (QONNX BipolarQuant).
        taps: mark every neuron output with a SpikeTap op.
    """
    from brevitas.nn import QuantIdentity

    from brevitas.quant import SignedBinaryActPerTensorConst
    work = copy.deepcopy(model).cpu().eval()
    for name, module in list(work.named_modules()):
        if is_binary_layer(module):
            with torch.no_grad():
                module.weight.copy_(standardize_per_channel(module.weight))
            module.quant_weight = types.MethodType(_constant_quant_weight, module)
        if not name or not is_neuron(module):
            continue
        if bipolar_spikes and isinstance(module, LIF):
            module.add_module("bc_spike_quant", QuantIdentity(act_quant=SignedBinaryActPerTensorConst,
                                                              return_quant_tensor=False))
            module.fire = types.MethodType(_bipolar_fire, module)
        if taps:
            module.forward = _tapped_forward(module.forward, name)
    work.forward = _logits_forward(work.forward, work)
    return work


def _logits_forward(forward, model):
    def run(*args, **kwargs):
        x = args[0] if args else None
        batch = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        return logits_of(forward(*args, **kwargs), model, batch)
    return run
