"""Binary attention for blocks that cannot be traced: intercept their matmuls with a TorchFunctionMode."""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

MATMUL_FUNCS = {torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm, torch.Tensor.__matmul__,
                torch.Tensor.__rmatmul__, operator.matmul}
# Ops through which a map stays "the map" (scalar scaling, layout, dropout).
PASS_THROUGH = {torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__truediv__, torch.mul, torch.div,
                torch.Tensor.mul, torch.Tensor.div, torch.Tensor.contiguous, torch.nn.functional.dropout,
                torch.Tensor.float, torch.Tensor.to}
SOFTMAX_FUNCS = {torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}


def _is_activation(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)


class _MatmulRecorder(TorchFunctionMode):
    """Counts activation×activation matmuls and whether one consumes the result of another."""

    def __init__(self) -> None:
        super().__init__()
        self.products: list[torch.Tensor] = []
        self.chains = 0
        self.softmax = False

    def _tracked(self, t) -> bool:
        return any(t is p for p in self.products)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in MATMUL_FUNCS and len(tensors) == 2 and all(_is_activation(t) for t in tensors):
            if any(self._tracked(t) for t in tensors):
                self.chains += 1
            else:
                self.products.append(out)
        elif tensors and self._tracked(tensors[0]) and (func in PASS_THROUGH or func in SOFTMAX_FUNCS):
            self.softmax |= func in SOFTMAX_FUNCS
            self.products.append(out)
        return out


def probe_attention(module: nn.Module, args: tuple) -> tuple[int, bool]:
    """(number of matmul chains Q·K·V, whether a softmax sits in one) seen in one forward of `module`."""
    rec = _MatmulRecorder()
    with torch.no_grad(), rec:
        module(*args)
    return rec.chains, rec.softmax


class _BinarizeMode(TorchFunctionMode):
    def __init__(self, owner: "InterceptedAttention") -> None:
        super().__init__()
        self.owner = owner
        self.maps: list[torch.Tensor] = []

    def _tracked(self, t) -> bool:
        return any(t is m for m in self.maps)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in MATMUL_FUNCS and len(tensors) == 2 and all(_is_activation(t) for t in tensors):
            out = func(*args, **kwargs)
            if any(self._tracked(t) for t in tensors):
                # torch takes this mode off the stack while __torch_function__ runs: the inserted modules'
                # own ops are not intercepted.
                return self.owner.map_scale(out)
            spikes = self.owner.map_neuron(out)
            self.maps.append(spikes)
            return spikes
        if tensors and self._tracked(tensors[0]) and func in SOFTMAX_FUNCS:
            if self.owner.softmax == "replace":
                return tensors[0]  # the binary map replaces the softmax
        out = func(*args, **kwargs)
        if tensors and self._tracked(tensors[0]) and func in PASS_THROUGH:
            self.maps.append(out)
        return out


class InterceptedAttention(nn.Module):
    """Wraps an untraceable attention block: its first activation×activation matmul goes through the map
    neuron, and the matmul that consumes that map is multiplied by the learnable scale lambda."""

    bc_leaf = True

    def __init__(self, block: nn.Module, map_neuron: nn.Module, map_scale: nn.Module, softmax: str = "error") -> None:
        super().__init__()
        self.block = block
        self.map_neuron = map_neuron
        self.map_scale = map_scale
        self.softmax = softmax

    def forward(self, *args, **kwargs):
        with _BinarizeMode(self):
            return self.block(*args, **kwargs)

    def __getattr__(self, name: str):
        # Answer the wrapped block's own attributes and helper methods (e.g. a snntorch block's `init_mems()`),
        # which an eager parent keeps calling after the swap.
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_modules", {}).get("block")
            if block is None:
                raise
            return getattr(block, name)
