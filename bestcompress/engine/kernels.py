"""Bit-packed operands and popcount products, on the compiled kernels or their NumPy twin.

An activation whose values are non-negative dyadic numbers x = q·2^lsb (spikes: q ∈ {0, 1}, lsb = 0; a residual
stream of spikes and ½-couplings: a few bits of q) is packed as P bit planes of 64-bit words along the reduction
axis. Products are then popcounts:
    ±1 weights (w⁺ = bits where w = +1):  x·w = 2^lsb · Σ_p 2^p (2·popcount(q_p ∧ w⁺) − popcount(q_p))
    two packed operands:                  x·y = 2^(lsb_x+lsb_y) · Σ_{p,r} 2^(p+r) popcount(q_p ∧ q'_r)
The integer sums are exact; the float result is the exact sum rounded once (then the channel scale and bias),
as float32 PyTorch computes it while the sums stay below 2^24.

The compiled kernels (`_bitkernels`, built at install) are used when they import; otherwise, or inside
`use_backend("numpy")`, NumPy computes the same integers (slower, for machines without a compiler). They pick
their popcount variant at run time (`isa()`; `use_kernels(isa=...)` or BESTCOMPRESS_ENGINE_ISA to force one), and
on a CPU with int8 matrix units (x86 AMX) a linear layer's input of up to 8 bit planes is multiplied as bytes
there (`use_kernels(int8='off'|'multi'|'all')` or BESTCOMPRESS_ENGINE_INT8; default 'all': on an AMX Xeon the
tiles beat the popcounts on {0, 1} spikes too, and the popcount cost grows with the planes while the int8 cost
does not; 'multi' keeps spikes on popcounts). With 'all', a convolution whose output rows are groups of 16
columns runs there too (an implicit GEMM over an NHWC byte image, bk_amx_conv.c); 'multi' and 'off' keep
convolutions on popcounts. Weights stay one bit each in RAM.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass

import numpy as np
import torch

try:  # built at install by setup.py; absent when no compiler was available
    _ext = importlib.import_module(__name__.rpartition(".")[0] + "._bitkernels")
except ImportError:  # pragma: no cover - depends on the install
    _ext = None

MAX_PLANES = 24
ISAS = ("scalar", "avx2", "avx512", "neon")  # the compiled popcount variants, by their number in bk.h
_state = {"backend": "compiled" if _ext is not None and os.environ.get("BESTCOMPRESS_ENGINE") != "numpy"
          else "numpy",
          "isa": os.environ.get("BESTCOMPRESS_ENGINE_ISA", "best"),
          "int8": os.environ.get("BESTCOMPRESS_ENGINE_INT8", "all")}
# int8 matrix units (x86 AMX) for linear layers: never, for inputs other than {0, 1} spikes (several bit planes:
# the popcount cost grows with the planes, the int8 cost does not), or for every input (the default: measured by
# benchmarks/bench_engine.py on an AMX Xeon, spike-fed linears are as fast or faster on the tiles)
INT8_MODES = ("off", "multi", "all")


def backend() -> str:
    """'compiled' (the popcount extension) or 'numpy' (the fallback)."""
    return _state["backend"]


def isa() -> str:
    """The popcount variant the compiled kernels run: the best this CPU has, or the one `use_isa` chose."""
    if _ext is None:
        return "none"
    name = _state["isa"]
    if name in ISAS and _ext.isa_supported(ISAS.index(name)):
        return name
    return ISAS[_ext.best_isa()]


def _isa_number() -> int:
    return ISAS.index(isa())


_MODES: dict = {}


def _modes() -> tuple[int, int]:
    """(popcount variant number, int8 mode number) of the current choice, looked up once per choice: a layer
    call then costs one dict lookup instead of several calls into the extension."""
    key = (_state["backend"], _state["isa"], _state["int8"])
    got = _MODES.get(key)
    if got is None:
        got = _MODES[key] = (_isa_number(), INT8_MODES.index(int8_units()))
    return got


def int8_units() -> str:
    """When linear layers use the CPU's int8 matrix units (x86 AMX): 'off' (also without AMX), 'multi' (inputs
    of several bit planes) or 'all' (the default)."""
    mode = _state["int8"] if _state["int8"] in INT8_MODES else "all"
    return mode if backend() == "compiled" and _ext.amx_available() else "off"


def backend_description() -> str:
    if backend() == "compiled":
        extra = {"off": "", "multi": "; linear inputs of several bit planes on AMX int8 tiles",
                 "all": "; linear layers and convolutions on AMX int8 tiles"}[int8_units()]
        return f"compiled popcount kernels ({_ext.isa_name(_isa_number())}{extra})"
    why = "the compiled kernels were not built (no compiler at install)" if _ext is None else "selected"
    return f"NumPy fallback ({why})"


def supported_isas() -> list[str]:
    return [] if _ext is None else [name for n, name in enumerate(ISAS) if _ext.isa_supported(n)]


@contextlib.contextmanager
def use_kernels(isa: str | None = None, int8: str | None = None):
    """Inside the block, run the compiled kernels' `isa` popcount variant (scalar, avx2, avx512, neon) and use the
    int8 matrix units as `int8` says ('off', 'multi', 'all'); None keeps the current choice. A variant this CPU
    cannot run is refused."""
    if _ext is None:
        raise RuntimeError("the compiled kernels are not built")
    if isa is not None and isa not in supported_isas():
        raise ValueError(f"this CPU does not run the {isa!r} kernels (it runs: {', '.join(supported_isas())})")
    if int8 is not None and int8 not in INT8_MODES:
        raise ValueError(f"int8 must be one of {', '.join(INT8_MODES)}, got {int8!r}")
    old = dict(_state)
    _state.update({k: v for k, v in (("isa", isa), ("int8", int8)) if v is not None})
    try:
        yield
    finally:
        _state.update(old)


def compiled_available() -> bool:
    return _ext is not None


@contextlib.contextmanager
def use_backend(name: str):
    """Run the engine on 'compiled' or 'numpy' kernels inside the block."""
    if name not in ("compiled", "numpy"):
        raise ValueError(f"backend must be 'compiled' or 'numpy', got {name!r}")
    if name == "compiled" and _ext is None:
        raise RuntimeError("the compiled kernels are not built")
    old = _state["backend"]
    _state["backend"] = name
    try:
        yield
    finally:
        _state["backend"] = old


@dataclass
class Packed:
    """Bit planes of a [rows, K] operand: words [P, rows, Kw] (int64 holding uint64 bits), the value of one
    quantum (2^lsb) and, per row, the sum of the integer values q (what the ±1 product subtracts)."""

    words: torch.Tensor
    planes: int
    lsb: int
    rowsum: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.words.numel() * 8 + self.rowsum.numel() * 8


def words_for(k: int) -> int:
    return (k + 63) // 64


def _u64(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint64)


# ---------------------------------------------------------------------------------------------- NumPy twin

def _np_analyze(x: np.ndarray) -> tuple[int, int]:
    u = x.reshape(-1).view(np.uint32)
    nz = u[(u & 0x7FFFFFFF) != 0]
    if not nz.size:
        return 1, 0
    e = ((nz >> 23) & 0xFF).astype(np.int64)
    if bool((nz >> 31).any()) or bool((e == 0).any()) or bool((e == 0xFF).any()):
        return -1, 0
    m = ((nz & 0x7FFFFF) | 0x800000).astype(np.int64)
    tz = np.zeros_like(m)
    rest = m.copy()
    for _ in range(24):  # trailing zeros of the 24-bit mantissa
        even = (rest & 1) == 0
        if not even.any():
            break
        tz += even
        rest = np.where(even, rest >> 1, rest)
    lo, hi = int((e - 150 + tz).min()), int((e - 127).max())
    planes = hi - lo + 1
    return (planes, lo) if planes <= MAX_PLANES else (-1, 0)


def _np_pack(x: np.ndarray, planes: int, lsb: int, kw: int) -> tuple[np.ndarray, np.ndarray]:
    rows, k = x.shape
    q = np.ldexp(x.astype(np.float64), -lsb).astype(np.int64)
    out = np.zeros((planes, rows, kw * 64), dtype=np.uint8)
    for p in range(planes):
        out[p, :, :k] = (q >> p) & 1
    words = np.packbits(out.reshape(planes, rows, kw, 64), axis=-1, bitorder="little")
    return words.reshape(planes, rows, kw * 8).view(np.uint64), q.sum(1)


def _np_gemm(a: np.ndarray, b_cols: np.ndarray, rowsum, mode: int, n: int, scale: float) -> np.ndarray:
    """a [Pa, batch, M, Kw], b_cols [Pb, batch, Kw, Npad] -> float32 [batch, M, n] before channel scale/bias."""
    pa, batch, m, kw = a.shape
    pb = b_cols.shape[0]
    acc = np.zeros((batch, m, n), dtype=np.int64)
    bt = np.ascontiguousarray(b_cols[..., :n].transpose(0, 1, 3, 2))  # [Pb, batch, n, Kw]
    chunk = max(1, (1 << 22) // max(1, n * kw))
    for i in range(pa):
        for j in range(pb):
            for s in range(0, m, chunk):
                both = a[i, :, s:s + chunk, None, :] & bt[j, :, None, :, :]
                acc[:, s:s + chunk] += np.bitwise_count(both).sum(-1, dtype=np.int64) << (i + j)
    if mode == 0:
        acc = 2 * acc - rowsum.reshape(batch, m, 1)
    return acc.astype(np.float32) * np.float32(scale)


# ------------------------------------------------------------------------------------------------- the API

def pack_rows(x: torch.Tensor, max_planes: int = MAX_PLANES) -> Packed | None:
    """Pack a float32 [rows, K] tensor along K, or None when its values are not non-negative dyadic numbers of
    at most `max_planes` bits (negative, fractional beyond float precision, non-finite, subnormal)."""
    x = x.detach().to(torch.float32).contiguous()
    rows, k = x.shape
    kw = words_for(k)
    if backend() == "compiled":
        planes, lsb = _ext.analyze(x.data_ptr(), x.numel())
        if planes < 0 or planes > max_planes:
            return None
        words = torch.empty((planes, rows, kw), dtype=torch.int64)
        rowsum = torch.empty(rows, dtype=torch.int64)
        _ext.pack(x.data_ptr(), rows, k, kw, planes, lsb, words.data_ptr(), rowsum.data_ptr())
        return Packed(words, planes, lsb, rowsum)
    xn = x.numpy()
    planes, lsb = _np_analyze(xn)
    if planes < 0 or planes > max_planes:
        return None
    words, rowsum = _np_pack(xn, planes, lsb, kw)
    return Packed(torch.from_numpy(words.view(np.int64).copy()), planes, lsb, torch.from_numpy(rowsum))


def im2col(pixels: Packed, n: int, h: int, w: int, kernel, stride, padding, dilation) -> tuple[Packed, int, int]:
    """Bit im2col: pixel planes [P, n·h·w, Cw] -> patch planes [P, n·Ho·Wo, kh·kw·Cw] (zero words where padded)."""
    (kh, kw_), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw_ - 1) - 1) // sw + 1
    planes, _, cw = pixels.words.shape
    rows = n * ho * wo
    if backend() == "compiled":
        words = torch.empty((planes, rows, kh * kw_ * cw), dtype=torch.int64)
        rowsum = torch.empty(rows, dtype=torch.int64)
        _ext.im2col(pixels.words.data_ptr(), pixels.rowsum.data_ptr(), planes, n, h, w, cw, kh, kw_, sh, sw, ph, pw,
                    dh, dw, ho, wo, words.data_ptr(), rowsum.data_ptr())
        return Packed(words, pixels.planes, pixels.lsb, rowsum), ho, wo
    src = pixels.words.view(planes, n, h, w, cw)
    srs = pixels.rowsum.view(n, h, w)
    padded = torch.zeros((planes, n, h + 2 * ph, w + 2 * pw, cw), dtype=torch.int64)
    padded[:, :, ph:ph + h, pw:pw + w] = src
    prs = torch.zeros((n, h + 2 * ph, w + 2 * pw), dtype=torch.int64)
    prs[:, ph:ph + h, pw:pw + w] = srs
    cols, sums = [], torch.zeros((n, ho, wo), dtype=torch.int64)
    for i in range(kh):
        for j in range(kw_):
            ys, xs = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh), slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            cols.append(padded[:, :, ys, xs])
            sums += prs[:, ys, xs]
    words = torch.cat(cols, -1).reshape(planes, rows, kh * kw_ * cw)
    return Packed(words.contiguous(), pixels.planes, pixels.lsb, sums.reshape(rows)), ho, wo


def to_columns(words: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """[P, batch·rows, Kw] -> [P, batch, Kw, Npad] (Npad = rows rounded up to 8): the B operand layout."""
    planes, total, kw = words.shape
    rows = total // batch
    npad = (rows + 7) // 8 * 8
    out = torch.empty((planes, batch, kw, npad), dtype=torch.int64)
    if backend() == "compiled":
        words = words.contiguous()
        for p in range(planes):
            _ext.transpose(words[p].data_ptr(), batch, rows, kw, npad, out[p].data_ptr())
        return out
    out.zero_()
    out[..., :rows] = words.view(planes, batch, rows, kw).transpose(-1, -2)
    return out


def _bn_args(bn) -> tuple:
    if bn is None:
        return (0, 0, 0, 0, 0)
    mode, params = bn
    ptrs = [t.data_ptr() for t in params] + [0] * (4 - len(params))
    return (mode, *ptrs)


def apply_bn(y: torch.Tensor, bn, channel_axis: int) -> torch.Tensor:
    """The folded BatchNorm epilogue in torch/NumPy arithmetic (the NumPy twin of the kernels' epilogue)."""
    if bn is None:
        return y
    mode, params = bn
    shape = [1] * y.dim()
    shape[channel_axis] = -1
    p = [t.view(shape) for t in params]
    if mode == 1:  # fma(y, a, b): exact product in float64, one rounding of the sum
        return (y.double() * p[0].double() + p[1].double()).to(torch.float32)
    return ((y - p[0]) * p[1]) * p[2] + p[3]


def gemm(a: Packed, b_cols: torch.Tensor, n: int, batch: int = 1, b_planes: int = 1, b_lsb: int = 0,
         weights: bool = True, alpha: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         bn=None) -> torch.Tensor:
    """out[batch, m, n] = Σ_k a[m, k]·b[k, n] from packed operands.

    Args:
        a: packed rows, words [Pa, batch·M, Kw].
        b_cols: [Pb, batch, Kw, Npad] (to_columns); with `weights`, one plane of w⁺ bits of ±1 weights.
        n: output columns.
        alpha, bias: float32 [n] channel scale and bias (weights only), applied after the exact sum.
    """
    pa, total, kw = a.words.shape
    m = total // batch
    npad = b_cols.shape[-1]
    scale = float(2.0 ** (a.lsb + (0 if weights else b_lsb)))
    mode = 0 if weights else 1
    alpha = None if alpha is None else alpha.to(torch.float32).contiguous()
    bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
    if backend() == "compiled":
        out = torch.empty((batch, m, n), dtype=torch.float32)
        _ext.gemm(a.words.data_ptr(), b_cols.data_ptr(), a.rowsum.data_ptr() if weights else 0, out.data_ptr(),
                  0 if alpha is None else alpha.data_ptr(), 0 if bias is None else bias.data_ptr(), mode, batch,
                  m, n, npad, kw, total * kw, m * kw, b_cols.shape[1] * kw * npad, kw * npad, m * n, n, pa, b_planes,
                  scale, _isa_number(), 0, 0, *_bn_args(bn))
        return out
    res = _np_gemm(_u64(a.words).reshape(pa, batch, m, kw), _u64(b_cols), a.rowsum.numpy() if weights else None,
                   mode, n, scale)
    if alpha is not None:
        res = res * alpha.numpy()
    if bias is not None:
        res = res + bias.numpy()
    return apply_bn(torch.from_numpy(np.ascontiguousarray(res, dtype=np.float32)), bn, -1)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def linear_args(weight_cols: torch.Tensor, n: int, alpha: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, bn=None) -> tuple:
    """The weight-side arguments of `linear_prepared` (addresses: the tensors must outlive their use)."""
    return (weight_cols.data_ptr(), weight_cols.shape[-1], n, _ptr(alpha), _ptr(bias), *_bn_args(bn))


def linear_prepared(x: torch.Tensor, args: tuple, max_planes: int = MAX_PLANES
                    ) -> tuple[torch.Tensor, int, str] | None:
    """`linear` with the weight side given as `linear_args` (a layer computes them once): out [..., n] in x's
    leading shape. Compiled kernels only."""
    k = x.shape[-1]
    rows = x.numel() // max(1, k)
    inner = 0
    if not x.is_contiguous():
        if x.dim() >= 2 and x.transpose(-1, -2).is_contiguous():
            inner = x.shape[-2]  # a transposed view (tokens x channels over channels x tokens): gathered in C
        else:
            x = x.contiguous()
    out = torch.empty(x.shape[:-1] + (args[2],), dtype=torch.float32)
    isa_n, int8 = _modes()
    planes, _, kernel = _ext.linear(x.data_ptr(), rows, k, max_planes, *args, out.data_ptr(), isa_n, int8, inner)
    if planes < 0:
        return None
    return out, planes, "int8" if kernel else "popcount"


def linear(x: torch.Tensor, weight_cols: torch.Tensor, n: int, alpha: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, max_planes: int = MAX_PLANES, bn=None
           ) -> tuple[torch.Tensor, int, str] | None:
    """A ±1-weight linear layer of a float32 [..., K] input in one compiled call (analyze, pack once, product,
    epilogue), or None when x does not pack. Returns (out [rows, n], bit planes of x, 'popcount' or 'int8').
    A transposed view (Spikformer's tokens × channels over a channels × tokens tensor) is read in place.

    Args:
        weight_cols: [1, 1, Kw, Npad] words of w⁺ (to_columns).
        alpha, bias: float32 [n] contiguous, or None.
    """
    x = x.detach()
    done = linear_prepared(x, linear_args(weight_cols, n, alpha, bias, bn), max_planes)
    return None if done is None else (done[0].view(-1, n), done[1], done[2])


def conv_nchw(x: torch.Tensor, weight_rows: torch.Tensor, cout: int, kernel, stride, padding, dilation,
              alpha: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              max_planes: int = MAX_PLANES, bn=None) -> tuple[torch.Tensor, int, str] | None:
    """A ±1-weight convolution of a float32 NCHW input, compiled kernels only: the input is packed along C
    straight from NCHW, im2col writes the column layout, and out[n] = W · patches[n]ᵀ lands in NCHW order, so no
    transposing copy is made. With int8 'all' on an AMX CPU, an input of at most 8 planes whose output rows are
    groups of 16 columns goes to the int8 matrix units instead (bk_amx_conv.c: an implicit GEMM over an NHWC byte
    image). Returns (output, bit planes of x, 'popcount' or 'int8'), or None when x does not pack.

    Args:
        weight_rows: [1, Cout, kh·kw·Cw] words of w⁺ (channel groups padded to whole words).
    """
    x = x.detach().contiguous()
    n, c, h, w = x.shape
    (kh, kw_), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw_ - 1) - 1) // sw + 1
    out = torch.empty((n, cout, ho, wo), dtype=torch.float32)
    planes = _ext.conv(x.data_ptr(), n, c, h, w, max_planes, weight_rows.data_ptr(), cout, kh, kw_, sh, sw, ph, pw,
                       dh, dw, ho, wo, _ptr(alpha), _ptr(bias), *_bn_args(bn), out.data_ptr(), *_modes())
    planes, kernel = planes
    if planes < 0:
        return None
    return out, planes, "int8" if kernel else "popcount"
