"""The values the FINN step interpreter (finn_unroll.py) passes between nodes: `Steps`, T per-step tensors of one
time-dependent value, `Scaled`, steps times a power-of-two factor kept apart until a MatMul, and the walkers that
find or map them inside an fx node's (nested) arguments."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class Steps(list):
    """T per-step tensors of one time-dependent value: kind 'tf' ([T, B, ...]) or 'tb' ([T·B, ...])."""

    def __init__(self, items, kind: str, integer: bool = False, affine=None) -> None:
        super().__init__(items)
        self.kind = kind
        self.integer = integer  # every value an integer (spikes, their sums, ±1 products of them)
        self.affine = affine  # finn_lif.AffineSteps: these values are α·A_t + β of integer steps A_t

    def fake_shape(self) -> tuple[int, ...]:
        s = tuple(self[0].shape)
        return (len(self),) + s if self.kind == "tf" else (len(self) * s[0],) + s[1:]

    def stacked(self) -> torch.Tensor:
        return torch.stack(list(self), 0) if self.kind == "tf" else torch.cat(list(self), 0)


@dataclass
class Scaled:
    """Steps times a power-of-two scalar, kept apart until a MatMul has consumed the unscaled steps."""

    steps: Steps
    factor: float

    def value(self) -> Steps:
        return Steps([s * self.factor for s in self.steps], self.steps.kind)


def flat_args(args, kwargs):
    out = []

    def walk(a):
        if isinstance(a, (tuple, list)) and not isinstance(a, Steps):
            for b in a:
                walk(b)
        elif isinstance(a, dict):
            for b in a.values():
                walk(b)
        else:
            out.append(a)
    walk(args)
    walk(kwargs)
    return out


def map_steps(fn, args, kwargs):
    def m(a):
        if isinstance(a, Steps):
            return fn(a)
        if isinstance(a, tuple) and not isinstance(a, torch.Size):
            return tuple(m(b) for b in a)
        if isinstance(a, list):
            return [m(b) for b in a]
        if isinstance(a, dict):
            return {k: m(v) for k, v in a.items()}
        return fn(a)
    return m(args), m(kwargs)
