"""Fused multi-step LIF: forward and backward over all T time steps in one pass each.

The plain `LIF.forward` loops over T in Python and lets autograd record ~10 small ops per step (and each `x[t]`
backward allocates a zero tensor of the whole input: T² work). `fused_lif` computes the same spikes in one pass,
saves only the membrane H (one tensor the size of the input), and computes the input gradient in one backward pass
with the same surrogate. Two backends, equal in spikes (bit for bit) and gradients (to float rounding):

- 'cpp': a C++ kernel (bestcompress/nn/csrc/lif.cpp, kernels in lif_body.h) compiled on first use with
  torch.utils.cpp_extension (g++ and ninja; cached per machine under TORCH_EXTENSIONS_DIR), multi-threaded with
  torch's thread pool. The kernels are compiled once per instruction set (baseline, AVX2, AVX-512) and picked at
  run time by what the CPU reports, so a cached build never runs instructions a machine lacks;
- 'torch': the same algorithm in torch ops under no_grad (used when the C++ kernel cannot be built; `lif_backend()`
  says which one runs and why);
- 'triton': for CUDA float32 tensors, Triton kernels (nn/lif_triton.py) when triton imports and a probe launch
  works (`lif_backend("cuda")` says); otherwise CUDA tensors keep the plain loop. CPU tensors never use it.

What backward needs is H alone: the surrogate is a function of H − V_th and a hard reset's spike is H >= V_th, so
no spike tensor is saved here; the spikes it returns are marked (nn/memory.py) so that the layers consuming them
save them as bits. Where the time goes is memory, so the C++ path moves as little as it can: without a graph
(inference) H is not written at all; the gradient of a sum (one value broadcast) is read as that value; backward
writes the input gradient over H when autograd will not keep the graph (H is dead after it); and S/H buffers come
from a small pool of freed blocks (csrc/lif.cpp; BESTCOMPRESS_LIF_POOL_MB, default 256) instead of fresh pages,
whose first-touch faults cost more than the kernels.

`BESTCOMPRESS_LIF=reference|torch|cpp|auto` (default auto) selects the CPU backend; 'reference' keeps the plain
loop on every device, any other value lets CUDA tensors run the Triton kernel.
The fused path serves LIF, IF and the attention-map neuron with their own charge/fire/reset (`LIF.kernel_params`
says when: subclasses that change them, such as ParametricLIF whose tau is learnable, keep the plain loop), CPU
float tensors and CUDA float32 tensors, and never runs while a graph is being traced or exported (those record the
plain ops). This module knows nothing of the neuron classes (a leaf below nn/lif.py).
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
from pathlib import Path

import torch

from ..errors import short_reason
from . import lif_triton
from .layout import as_dense, restore

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCE, _BODY = _CSRC / "lif.cpp", _CSRC / "lif_body.h"
_lock = threading.Lock()
_state: dict = {}


def _build():
    from torch.utils.cpp_extension import load
    # torch rebuilds when a source or a flag changes, not an included header: the header's hash is a flag
    body = hashlib.sha256(_BODY.read_bytes()).hexdigest()[:16]
    return load(name="bestcompress_lif", sources=[str(_SOURCE)], verbose=False,
                extra_cflags=["-O3", "-ffp-contract=off", "-fno-trapping-math", f"-DBESTCOMPRESS_LIF_BODY={body}"])


def _cpp():
    """The compiled kernel module, or None (the reason is kept for `lif_backend`)."""
    if "cpp" in _state:  # every forward asks: no lock once the build was tried
        return _state["cpp"]
    with _lock:
        if "cpp" not in _state:
            try:
                _state["why"], _state["cpp"] = "compiled C++ kernel", _build()
            except Exception as e:  # no compiler / ninja / headers: the torch backend computes the same
                _state["why"] = f"C++ kernel unavailable ({type(e).__name__}: {short_reason(e, 120)})"
                _state["cpp"] = None
        return _state["cpp"]


def requested_backend() -> str:
    value = os.environ.get("BESTCOMPRESS_LIF", "auto").strip().lower() or "auto"
    if value not in ("auto", "cpp", "torch", "reference"):
        raise ValueError(f"BESTCOMPRESS_LIF must be auto, cpp, torch or reference, not {value!r}")
    return value


def lif_backend(device: str = "cpu") -> tuple[str, str]:
    """(backend that runs for tensors on `device` ('cpu' or 'cuda'), why): 'cpp', 'torch', 'triton' or
    'reference'."""
    want = requested_backend()
    if want == "reference":
        return "reference", "BESTCOMPRESS_LIF=reference"
    if torch.device(device).type == "cuda":
        ok, why = lif_triton.available()
        return ("triton" if ok else "reference"), why
    if want == "torch":
        return "torch", "BESTCOMPRESS_LIF=torch"
    if _cpp() is not None:
        return "cpp", f"{_state['why']} ({_cpp().isa()})"
    if want == "cpp":
        raise RuntimeError(f"BESTCOMPRESS_LIF=cpp but the {_state['why']}")
    return "torch", _state["why"]


def _torch_forward(x, tau, v_th, v_reset, hard, decay_input, detach_reset, alpha, atan, integrate):
    base = v_reset if hard else 0.0
    v = torch.zeros_like(x[0])
    if hard and v_reset != 0.0:
        v = v + v_reset
    s_all, h_all = torch.empty_like(x), torch.empty_like(x)
    for t in range(x.shape[0]):
        if integrate:
            h = v + x[t]
        elif decay_input:
            h = v + (x[t] - (v - base)) / tau
        else:
            h = v - (v - base) / tau + x[t]
        s = (h - v_th >= 0).to(x.dtype)
        v = h * (1.0 - s) + v_reset * s if hard else h - v_th * s
        s_all[t], h_all[t] = s, h
    return s_all, h_all


def _torch_backward(grad_s, h_all, tau, v_th, v_reset, hard, decay_input, detach_reset, alpha, atan, integrate):
    dv = 1.0 if integrate else 1.0 - 1.0 / tau
    dx = 1.0 if (integrate or not decay_input) else 1.0 / tau
    gx = torch.empty_like(h_all)
    gv = torch.zeros_like(h_all[0])
    for t in range(h_all.shape[0] - 1, -1, -1):
        h = h_all[t]
        u = h - v_th
        if atan:
            sg = (alpha / 2) / (1 + (math.pi / 2 * alpha * u) ** 2)
        else:
            sig = torch.sigmoid(alpha * u)
            sg = alpha * sig * (1.0 - sig)
        g_spike = grad_s[t]
        if hard:
            if not detach_reset:
                g_spike = g_spike + gv * (v_reset - h)
            g_h = gv * (1.0 - (u >= 0).to(h.dtype))
        else:
            if not detach_reset:
                g_spike = g_spike - gv * v_th
            g_h = gv
        g_h = g_h + g_spike * sg
        gx[t] = g_h * dx
        gv = g_h * dv
    return gx


def _graph_kept() -> bool:
    """True when the running backward keeps the graph (retain_graph / create_graph): then the saved H must
    survive it. Asked of autograd's engine; if this torch cannot tell, the graph counts as kept."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


class _FusedLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backend: str, params: tuple):
        if backend == "cpp":
            s, h = _cpp().lif_forward(x, *params, True)
        elif backend == "triton":
            s, h = lif_triton.forward(x, params, True)
        else:
            with torch.no_grad():
                s, h = _torch_forward(x, *params)
        ctx.save_for_backward(h)
        ctx.backend, ctx.params = backend, params
        return s

    @staticmethod
    def backward(ctx, grad_s):
        (h,) = ctx.saved_tensors
        if ctx.backend == "cpp":  # H is dead after this backward unless the graph is kept: the gradient goes over it
            gx = _cpp().lif_backward(grad_s, h, *ctx.params, not _graph_kept())
        elif ctx.backend == "triton":
            gx = lif_triton.backward(grad_s, h, ctx.params, not _graph_kept())
        else:
            with torch.no_grad():
                gx = _torch_backward(grad_s.contiguous(), h, *ctx.params)
        return gx, None, None


_FUSED_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32,)}


def can_fuse(x: torch.Tensor) -> bool:
    """True when x is a plain CPU float tensor (or CUDA float32) outside any tracing/export (which must record the
    plain ops)."""
    if type(x) is not torch.Tensor or x.dtype not in _FUSED_DTYPES.get(x.device.type, ()):
        return False
    if x.dim() < 1 or x.shape[0] == 0:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return False
    return not torch.compiler.is_compiling()


def fused_lif(x: torch.Tensor, params: tuple) -> torch.Tensor | None:
    """Spikes of a neuron with kernel `params` for time-first x by the fused kernel, or None when the plain loop
    must run. params = (tau, v_threshold, v_reset, hard, decay_input, detach_reset, alpha, atan, integrate), as
    `LIF.kernel_params()` gives them."""
    backend, _ = lif_backend(x.device.type)
    if backend == "reference" or not can_fuse(x):
        return None
    x, order = as_dense(x, lead=1)  # a channels-last input is run in its own memory order (nn/layout.py)
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: no graph, and H is not even written
        if backend == "cpp":
            return restore(_cpp().lif_forward(x, *params, False)[0], order)
        if backend == "triton":
            return restore(lif_triton.forward(x, params, False)[0], order)
        with torch.no_grad():
            return restore(_torch_forward(x, *params)[0], order)
    return restore(_FusedLIF.apply(x, backend, params), order)
