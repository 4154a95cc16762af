"""Checking a neuron swap: both neurons run on the same seeded random input, spikes must be equal exactly and
surrogate gradients to float tolerance. Also `deepcopy_module`, a deepcopy that survives neuron state."""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn


def deepcopy_module(module: nn.Module) -> nn.Module:
    """copy.deepcopy that also works after a forward with autograd on: the membrane a stateful neuron kept
    (spikingjelly `v`, snntorch `mem`) is then a non-leaf tensor, which deepcopy refuses; it is copied detached."""
    memo: dict[int, object] = {}
    for m in module.modules():
        stack: list = [vars(m)]
        while stack:
            items = stack.pop()
            for v in (items.values() if isinstance(items, dict) else items):
                if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                    memo[id(v)] = v.detach().clone()
                elif isinstance(v, (dict, list, tuple)) and not isinstance(v, nn.Module):
                    stack.append(v)
    return copy.deepcopy(module, memo)


def _reset_reference(m: nn.Module) -> None:
    """Start a neuron from rest: spikingjelly/bestcompress reset(); snntorch drops its stored membrane."""
    if isinstance(getattr(m, "mem", None), torch.Tensor):
        m.mem = torch.zeros(0, device=m.mem.device)
    elif hasattr(m, "reset"):
        m.reset()


def _sample_shape(*modules: nn.Module) -> tuple[int, ...]:
    """A per-step input shape that per-neuron parameters (e.g. snntorch beta of shape [C, 1, 1]) broadcast to."""
    shape: tuple[int, ...] = (16,)
    for m in modules:
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t.dim() >= 1 and t.numel() > 1 and t.dim() >= len(shape):
                shape = tuple(3 if s == 1 else s for s in t.shape)
    return shape


def _threads_state(neuron: nn.Module) -> bool:
    """A norse-style cell: `z, state = cell(x, state)`, the caller passes the state on."""
    try:
        params = list(inspect.signature(neuron.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 and params[1] == "state"


def _run(neuron: nn.Module, x: torch.Tensor, multi_step: bool) -> torch.Tensor:
    if multi_step:
        out = neuron(x)
        return out[0] if isinstance(out, tuple) else out
    outs, state, threads = [], None, _threads_state(neuron)
    for t in range(x.shape[0]):
        out = neuron(x[t], state) if threads else neuron(x[t])
        if threads:
            state = out[1]
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.stack(outs, 0)


def _grads(neuron: nn.Module, x: torch.Tensor, multi_step: bool, weights: torch.Tensor):
    x = x.clone().requires_grad_(True)
    params = [p for p in neuron.parameters(recurse=False) if p.requires_grad]
    with torch.enable_grad():
        y = _run(neuron, x, multi_step)
        if not y.requires_grad:
            return y.detach(), None, []
        grads = torch.autograd.grad((y * weights).sum(), [x] + params, allow_unused=True)
    return y.detach(), grads[0], list(grads[1:])


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    finite = torch.isfinite(a)  # snntorch's sigmoid surrogate overflows to nan far from threshold
    return torch.allclose(a[finite], b[finite], rtol=1e-3, atol=1e-5)


def verify_swap(old: nn.Module, new: nn.Module, time_steps: int = 6, batch: int = 3, seed: int = 0,
                check_gradients: bool = True) -> str | None:
    """None when `new` reproduces `old` on seeded random input (spikes exactly, surrogate gradients to float
    tolerance); otherwise one sentence saying what differs. Runs on copies: neither neuron's state changes."""
    ref, can = deepcopy_module(old), deepcopy_module(new)
    _reset_reference(ref)
    _reset_reference(can)
    multi_step = getattr(can, "step_mode", "m") == "m"
    try:
        device = next(iter(list(ref.parameters()) + list(ref.buffers()))).device
    except StopIteration:
        device = torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    thr = torch.as_tensor(getattr(old, "v_threshold", getattr(old, "threshold", 1.0)), dtype=torch.float32)
    scale = 1.5 * max(1.0, float(thr.abs().max()))
    shape = (time_steps, batch) + _sample_shape(ref, can)
    x = (torch.randn(shape, generator=g) * scale + 0.25 * scale).to(device)
    weights = torch.randn(shape, generator=g).to(device)
    try:
        with torch.no_grad():
            y_ref = _run(ref, x, multi_step)
        _reset_reference(ref)
        y_can = _run(can, x, multi_step)
        _reset_reference(ref)
        _reset_reference(can)
    except Exception as e:  # the reference cannot run here (e.g. a CUDA-only backend): cannot verify
        return f"it could not be run for the check ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if y_ref.shape != y_can.shape or not torch.equal(y_ref.to(y_can.dtype), y_can):
        n = (y_ref != y_can).sum().item() if y_ref.shape == y_can.shape else "all"
        return f"the canonical neuron's spikes differ on random input ({n} of {y_can.numel()})"
    if not check_gradients:
        return None
    _, gx_ref, gp_ref = _grads(ref, x, multi_step, weights)
    _, gx_can, gp_can = _grads(can, x, multi_step, weights)
    if not _close(gx_ref, gx_can) or len(gp_ref) != len(gp_can) or not all(map(_close, gp_ref, gp_can)):
        return "the canonical neuron's surrogate gradients differ on random input"
    return None
