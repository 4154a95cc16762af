"""StreamQuant: a coupled residual stream as a signed n-bit integer times a power of two (recipe
`reversible.stream_bits`).

With learnable couplings z_k = F_k(z_{k-1}) + a_k·z_{k-2} + b_k·z_{k-1} (nn/reversible.py) the stream is a real
combination of spike tensors, which no integer datatype holds; the 1-bit layers reading it (q/k/v and fc1 of every
block after the first) then multiply ±1 weights by floats, and FINN keeps them as float MatMuls. StreamQuant puts
each coupling's output on the grid

    Q(z) = 2^e · clamp(⌊z / 2^e + ½⌋, −2^(n−1), 2^(n−1) − 1)

(round half up, so that `z ≥ 2^e·(m − ½)` decides each level exactly: a MultiThreshold in FINN), with e chosen by
calibration as the smallest exponent whose grid holds the largest |z| observed: 2^e·(2^(n−1) − 1) ≥ max|z|
(`calibrate_stream_scales`). In training the gradient is straight through inside the clamp range and zero
outside it. Until calibrated the module is the identity (the float stream), so a model binarized but never
calibrated computes what it did without the option.

In the FINN-ready graph (`finn_lowering()`), Q is exported as MultiThreshold(z, 2^n − 1 thresholds 2^e·(m − ½),
out_dtype INTn, out_bias −2^(n−1)) followed by Mul(2^e): FINN's Streamline moves the scalar Mul past the next
MatMul, which then reads an INTn stream with BIPOLAR weights (an MVAU). Elsewhere (QONNX, ONNX, PyTorch) it is
plain Div/Add/Floor/Clip/Mul arithmetic, exactly the same values.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
from torch import nn

from .state import forward_batches

MIN_BITS, MAX_BITS = 2, 16
_FINN = {"on": False}
SPIKE_DOMAIN = "qonnx.custom_op.general"


@contextlib.contextmanager
def finn_lowering():
    """While active, a calibrated StreamQuant exports as MultiThreshold(INTn) → Mul(2^e) (module docstring)."""
    old = _FINN["on"]
    _FINN["on"] = True
    try:
        yield
    finally:
        _FINN["on"] = old


def grid_levels(z: torch.Tensor, exponent: int, bits: int) -> torch.Tensor:
    """The integer levels ⌊z / 2^e + ½⌋ clamped to the signed n-bit range (as z's dtype; exact: 2^e scaling and
    the +½ are done in float64)."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.floor(z.double() * (2.0 ** -exponent) + 0.5).clamp(lo, hi)
    return q.to(z.dtype)


class _RoundSTE(torch.autograd.Function):
    """Q(z) forward; gradient 1 where z lies inside the clamp range, 0 outside."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, exponent: int, bits: int) -> torch.Tensor:
        scale = 2.0 ** exponent
        half = 2 ** (bits - 1)
        ctx.save_for_backward((z >= -scale * (half + 0.5)) & (z < scale * (half - 0.5)))
        return grid_levels(z, exponent, bits) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


class _FinnStreamThreshold(torch.autograd.Function):
    """Q(z); exported as MultiThreshold(INTn, thresholds 2^e·(m − ½)) → Mul(2^e)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, exponent: int, bits: int) -> torch.Tensor:
        return grid_levels(z, exponent, bits) * (2.0 ** exponent)

    @staticmethod
    def symbolic(g, z, exponent: int, bits: int):
        lo = -(2 ** (bits - 1))
        levels = torch.arange(lo + 1, 2 ** (bits - 1), dtype=torch.float64)  # m = lo+1 .. hi: z ≥ 2^e(m − ½)
        thr = ((levels - 0.5) * (2.0 ** exponent)).to(torch.float32).reshape(1, -1)
        t = g.op("Constant", value_t=thr)
        q = g.op(f"{SPIKE_DOMAIN}::MultiThreshold", z, t, out_dtype_s=f"INT{bits}", out_bias_f=float(lo))
        q.setType(z.type())
        s = g.op("Constant", value_t=torch.tensor(2.0 ** exponent, dtype=torch.float32))
        return g.op("Mul", q, s)


class StreamQuant(nn.Module):
    """z ↦ 2^e·clamp(⌊z/2^e + ½⌋, −2^(n−1), 2^(n−1) − 1) with a straight-through gradient (module docstring).

    Args:
        bits: n, the signed integer width (2..16).
    State (buffers, saved with the model): `exponent` (e, int64 scalar) and `calibrated` (bool scalar; before
    calibration the module passes its input through unchanged).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"stream bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
        self.bits = bits
        self.register_buffer("exponent", torch.zeros((), dtype=torch.int64))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    @property
    def scale(self) -> float:
        return 2.0 ** int(self.exponent)

    def set_range(self, max_abs: float) -> int:
        """Calibrate: the smallest e with 2^e·(2^(n−1) − 1) ≥ max_abs (max_abs ≤ 0: e = 0). Returns e."""
        top = 2 ** (self.bits - 1) - 1
        e = 0 if not max_abs > 0 else math.ceil(math.log2(max_abs / top))
        while e > -1074 and 2.0 ** (e - 1) * top >= max_abs > 0:  # log2 rounding: keep the smallest e that holds
            e -= 1
        while 2.0 ** e * top < max_abs:
            e += 1
        self.exponent.fill_(e)
        self.calibrated.fill_(True)
        return e

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not bool(self.calibrated):
            return z
        e = int(self.exponent)
        if _FINN["on"] and torch.onnx.is_in_onnx_export():
            return _FinnStreamThreshold.apply(z, e, self.bits)
        return _RoundSTE.apply(z, e, self.bits)

    def extra_repr(self) -> str:
        state = f"scale=2^{int(self.exponent)}" if bool(self.calibrated) else "uncalibrated"
        return f"bits={self.bits}, {state}"


def stream_quants(model: nn.Module) -> list[StreamQuant]:
    return [m for m in model.modules() if isinstance(m, StreamQuant)]


def calibrate_stream_scales(model: nn.Module, batches: Iterable[torch.Tensor],
                            reset: Callable[[], None] | None = None) -> int:
    """Set every StreamQuant's power-of-two scale from the largest |input| seen on `batches` (eval mode, no
    gradients; every StreamQuant passes the float stream through while it is observed).

    Returns:
        The number of StreamQuant modules calibrated (0 when the model has none or `batches` was empty).
    """
    quants = stream_quants(model)
    if not quants:
        return 0
    peak = {id(q): 0.0 for q in quants}

    def record(mod, args):
        peak[id(mod)] = max(peak[id(mod)], float(args[0].detach().abs().max()))

    handles = [q.register_forward_pre_hook(record) for q in quants]
    was = [bool(q.calibrated) for q in quants]
    for q in quants:
        q.calibrated.fill_(False)
    seen = 0
    try:
        seen = forward_batches(model, batches, reset, handles)
    finally:
        if seen == 0:
            for q, c in zip(quants, was):
                q.calibrated.fill_(c)
    if seen == 0:
        return 0
    for q in quants:
        q.set_range(peak[id(q)])
    return len(quants)
