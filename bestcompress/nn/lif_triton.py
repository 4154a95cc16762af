"""Fused multi-step LIF for CUDA tensors: Triton kernels, forward and backward over all T in one launch each.

The GPU counterpart of the C++ kernel (csrc/lif_body.h), with the same algorithm and operation order: each
program owns a block of neurons and loops over the T steps, keeping the membrane (forward) or dL/dV (backward,
t from T-1 down to 0) in registers; forward writes the spikes and, when a graph is recorded, the membrane H
before reset, which is all backward needs (the surrogate is a function of H − V_th, a hard reset's spike is
H >= V_th). The gradient of a sum (one value broadcast) is read as that one value, and backward writes the input
gradient over H when the graph is not kept (lif_kernel decides).

Spikes equal the plain torch loop bit for bit: the kernels are compiled without fused multiply-adds
(`enable_fp_fusion=False`) and divide by tau with IEEE rounding (`tl.fdiv(..., ieee_rounding=True)`; Triton's
plain `/` may be approximate), as lif.cpp is built with -ffp-contract=off. The surrogate's exp is Triton's
(approximate on GPUs), so gradients equal the CPU's to float rounding, not bit for bit.

float32 only: scalar kernel arguments are float32 in Triton, so float64 thresholds would be rounded; float64,
bfloat16 and float16 CUDA tensors keep the plain loop (the CPU kernel does not serve 16-bit floats either).

`forward`/`backward` take `interpret=True` to run the same kernel bodies in Triton's interpreter on CPU tensors
(what the tests do on machines without a GPU); lif_kernel.py dispatches CUDA tensors here with interpret=False.
Triton reads TRITON_INTERPRET (its knob `triton.knobs.runtime.interpret`) when `triton.jit` decorates: the
interpreted copies are decorated with that knob set, in process. Triton's own library functions written in
Triton (tl.zeros, tl.sigmoid, tl.cdiv, ...) were decorated when triton was imported, so the kernel bodies call
builtins only (tl.full, tl.exp, tl.fdiv, ...): the interpreter tests fail if one creeps in.
Importing this module never imports triton: `available()` tries it once and says why not.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from ..errors import short_reason

BLOCK = 1024
NUM_WARPS = 4
_lock, _jit_lock = threading.Lock(), threading.Lock()
_state: dict = {}

# triton is imported on first use (_import), not with this module: the kernel bodies below read `tl` from the
# module globals only when they are decorated and run. Parameters annotated `constexpr` are compile-time constants
# (one compiled variant per value); the annotations stay the string "constexpr" (postponed annotations), which is
# how both Triton's compiler and its interpreter recognise them ("tl.constexpr" the interpreter would miss).
tl = constexpr = None


def _import() -> str | None:
    """Import triton into this module's globals; the reason when it cannot be imported, else None."""
    global tl, constexpr
    if tl is None:
        try:
            import triton.language
        except Exception as e:  # noqa: BLE001 - triton missing or broken: the plain loop runs
            return f"triton is not installed ({type(e).__name__}: {short_reason(e, 80)})"
        tl, constexpr = triton.language, triton.language.constexpr
    return None


def _forward_body(X, S, H, n, steps, tau, v_th, v_reset, BLOCK: constexpr, HARD: constexpr,
                  DECAY: constexpr, INTEGRATE: constexpr, SAVE_H: constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    zero = tl.full([BLOCK], 0.0, X.dtype.element_ty)
    if HARD:
        base = v_reset
        v = zero + v_reset
    else:
        base = 0.0
        v = zero
    xp, sp, hp = X + offs, S + offs, H + offs
    for _ in range(steps):
        x = tl.load(xp, mask=mask, other=0.0)
        if INTEGRATE:
            h = v + x
        elif DECAY:
            h = v + tl.fdiv(x - (v - base), zero + tau, ieee_rounding=True)
        else:
            h = (v - tl.fdiv(v - base, zero + tau, ieee_rounding=True)) + x
        s = ((h - v_th) >= 0).to(X.dtype.element_ty)
        if SAVE_H:
            tl.store(hp, h, mask=mask)
        tl.store(sp, s, mask=mask)
        if HARD:
            v = h * (1.0 - s) + v_reset * s
        else:
            v = h - v_th * s
        xp += n
        sp += n
        hp += n


def _backward_body(GS, H, GX, n, last, steps, dv, dx, v_th, v_reset, alpha, BLOCK: constexpr,
                   HARD: constexpr, DETACH: constexpr, ATAN: constexpr, GS_SCALAR: constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    zero = tl.full([BLOCK], 0.0, H.dtype.element_ty)
    gv = zero  # dL/dV_t, flowing back from step t+1
    if GS_SCALAR:
        g0 = zero + tl.load(GS)
    hp, gxp, gsp = H + last + offs, GX + last + offs, GS + last + offs  # gsp: not read when GS_SCALAR
    for _ in range(steps):
        h = tl.load(hp, mask=mask, other=0.0)
        u = h - v_th
        if GS_SCALAR:
            g_spike = g0
        else:
            g_spike = tl.load(gsp, mask=mask, other=0.0)
        if HARD:
            if not DETACH:
                g_spike = g_spike + gv * (v_reset - h)
            g_h = gv * (1.0 - (u >= 0).to(H.dtype.element_ty))
        else:
            if not DETACH:
                g_spike = g_spike - gv * v_th
            g_h = gv
        if ATAN:
            k = (1.5707963267948966 * alpha) * u
            sg = (alpha / 2.0) / (1.0 + k * k)
        else:
            sig = 1.0 / (1.0 + tl.exp(-(alpha * u)))
            sg = alpha * sig * (1.0 - sig)
        g_h = g_h + g_spike * sg
        tl.store(gxp, g_h * dx, mask=mask)
        gv = g_h * dv
        hp -= n
        gxp -= n
        gsp -= n


def _kernels(interpret: bool):
    """(forward, backward) kernels: compiled for the GPU, or run by Triton's interpreter on CPU tensors."""
    key = "interpreted" if interpret else "compiled"
    with _jit_lock:
        if key not in _state:
            missing = _import()
            if missing:
                raise RuntimeError(missing)
            import triton
            if interpret:  # the knob TRITON_INTERPRET sets, read when jit decorates
                with triton.knobs.runtime.scope():
                    triton.knobs.runtime.interpret = True
                    _state[key] = (triton.jit(_forward_body), triton.jit(_backward_body))
            else:  # compiled, or interpreted where TRITON_INTERPRET=1 says so, as for any Triton kernel
                _state[key] = (triton.jit(_forward_body), triton.jit(_backward_body))
    return _state[key]


def _probe() -> None:
    """One tiny forward and backward on the GPU, checked: a machine whose Triton cannot build or launch (no C
    compiler for its launcher, a GPU it does not support) fails here, once, not inside a training step."""
    x = torch.tensor([[0.3, 1.5], [0.9, -2.0]], device="cuda")
    params = (2.0, 0.5, 0.0, True, True, True, 4.0, False, False)
    s, h = forward(x, params, True)
    gx = backward(torch.ones_like(s), h, params, False)
    if s.tolist() != [[0.0, 1.0], [1.0, 0.0]] or not bool(torch.isfinite(gx).all()):
        raise RuntimeError(f"probe gave spikes {s.tolist()}, expected [[0, 1], [1, 0]]")


def available() -> tuple[bool, str]:
    """(whether CUDA float32 tensors run the Triton kernel, why), tried once per process."""
    with _lock:
        if "why" not in _state:
            _state["ok"], _state["why"] = _try()
    return _state["ok"], _state["why"]


def _try() -> tuple[bool, str]:
    missing = _import()
    if missing:
        return False, missing
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import triton
        _probe()
    except Exception as e:  # noqa: BLE001 - any failure to build or launch: the plain loop runs instead
        return False, f"Triton kernel unavailable ({type(e).__name__}: {short_reason(e, 120)})"
    return True, f"Triton kernel (triton {triton.__version__})"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _on(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device); nothing to do for the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(x: torch.Tensor, params: tuple, save_h: bool, *, interpret: bool = False,
            block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(spikes, H) of time-first float32 x [T, ...] for kernel `params` (LIF.kernel_params()); H is None
    unless save_h. interpret: run in Triton's interpreter (CPU tensors)."""
    tau, v_th, v_reset, hard, decay_input, _detach, _alpha, _atan, integrate = params
    x = x.contiguous()
    steps = x.shape[0]
    n = x.numel() // steps
    s = torch.empty_like(x)
    h = torch.empty_like(x) if save_h else s  # an unused pointer when H is not saved
    fwd, _ = _kernels(interpret)
    with _on(x):
        fwd[(_cdiv(n, block),)](x, s, h, n, steps, 1.0 if integrate else float(tau), float(v_th), float(v_reset),
                                BLOCK=block, HARD=bool(hard), DECAY=bool(decay_input), INTEGRATE=bool(integrate),
                                SAVE_H=bool(save_h), num_warps=NUM_WARPS, enable_fp_fusion=False)
    return s, (h if save_h else None)


def backward(grad_s: torch.Tensor, h: torch.Tensor, params: tuple, in_place: bool, *, interpret: bool = False,
             block: int = BLOCK) -> torch.Tensor:
    """Gradient of the input from the spikes' gradient and the saved (contiguous) H; in_place writes it over h.
    A gradient that is one value broadcast (that of a sum) is read as that value."""
    tau, v_th, v_reset, hard, decay_input, detach_reset, alpha, atan, integrate = params
    steps = h.shape[0]
    n = h.numel() // steps
    gs = grad_s.to(h.dtype)
    scalar = gs.numel() > 0 and all(st == 0 or sz == 1 for st, sz in zip(gs.stride(), gs.shape))
    if not scalar:
        gs = gs.contiguous()
    gx = h if in_place else torch.empty_like(h)
    dv = 1.0 if integrate else 1.0 - 1.0 / float(tau)  # dH_t / dV_{t-1}
    dx = 1.0 if (integrate or not decay_input) else 1.0 / float(tau)  # dH_t / dX_t
    _, bwd = _kernels(interpret)
    with _on(h):
        bwd[(_cdiv(n, block),)](gs, h, gx, n, (steps - 1) * n, steps, dv, dx, float(v_th), float(v_reset),
                                float(alpha), BLOCK=block, HARD=bool(hard), DETACH=bool(detach_reset),
                                ATAN=bool(atan), GS_SCALAR=scalar, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return gx
