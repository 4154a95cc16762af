"""The LIF membrane of the FINN-ready graph as integer arithmetic (τ = 2: the decay is a shift).

A neuron fed `x_t = α·A_t + β` (per element), where A_t is the integer accumulator of a ±1 MatMul/Conv on
integer input (spikes, sums of spikes) and α, β are that layer's scale and bias with the eval BatchNorm folded
in, is lowered without a float membrane. With τ = 2 and decay_input, h_t = (v_{t-1} + x_t) / 2, so H_t = 2^t·h_t
obeys H_t = (1 − s_{t−1})·H_{t−1} + 2^{t−1}·x_t (hard reset to 0) and H_t = α·I_t + β·R_t with

    I_t = (1 − s_{t−1})·I_{t−1} + 2^{t−1}·A_t      (an integer),   R_t = 2^t − 2^r   (r: the last firing step < t),

fire iff H_t ≥ 2^t·V_th. R_t takes one of t values, fixed by the spike history, so with σ = sign(α) the spike
is exactly [σ·I_t ≥ θ_{t,r}], θ_{t,r} = ⌈σ·(2^t·V_th − β·R)/α⌉: integer thresholds, selected by the one-hot
"last fired at r" (products of 1 − s, binary). The graph computes Z_t = σ·I_t − θ_{t,r} with integer adds and
multiplies by integer constants and fires with MultiThreshold(Z_t, [[0]], BINARY).

A soft reset (the attention-map neuron: v_t = h_t − V_th·s_t) with c = V_th/α an integer has one integer state:
M_t = M_{t−1} + 2^{t−1}·(A_t − c·s_{t−1}) and fires iff σ·M_t ≥ ⌈σ·(2^t·V_th − β·(2^t − 1))/α⌉ (no data-dependent
term). Anything else keeps the float lowering (finn_unroll.py), with the reason recorded.

The decisions equal PyTorch's float membrane except where that membrane is within float rounding of V_th (the
ties the stage checks already accept). Thresholds are clipped to ±2^22 (qonnx executes in float32: integers stay
exact below 2^24; an accumulator that large would not fit any layer here).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

CLIP = float(2 ** 22)


class AffineSteps(list):
    """The integer steps A_t (traced tensors) of a value that is α·A_t + β per element, with α and β per step.

    Subclasses nothing of finn_unroll's Steps on purpose: finn_unroll wraps it (AffineSteps is attached to a
    Steps as `.affine`), so every op that does not keep the affine form simply drops it.
    """

    def __init__(self, acc: list, alpha: list, beta: list) -> None:
        super().__init__(acc)
        self.alpha = alpha  # per step: float64 tensor of the step's full shape
        self.beta = beta


@contextlib.contextmanager
def untraced():
    """Run constant bookkeeping (α, β) outside the ONNX tracer."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def full(value, like: torch.Tensor) -> torch.Tensor:
    """`value` (a scalar or a tensor broadcastable to `like`) as a float64 tensor of like's shape."""
    with untraced():
        v = value.detach().double() if isinstance(value, torch.Tensor) else torch.tensor(float(value),
                                                                                          dtype=torch.float64)
        return v.expand(like.shape).clone()


def affine_of_layer(acc: list, alpha: torch.Tensor | None, bias: torch.Tensor | None, shape: tuple) -> AffineSteps:
    """A 1-bit layer's output α_c·A + b_c; `shape` views α and b along the output channels."""
    a = [full(1.0 if alpha is None else alpha.view(shape), s) for s in acc]
    b = [full(0.0 if bias is None else bias.detach().view(shape), s) for s in acc]
    return AffineSteps(acc, a, b)


def scaled_integers(acc: list, factor: float) -> AffineSteps:
    """Integer steps times a constant: α = factor, β = 0 everywhere."""
    return AffineSteps(acc, [full(factor, s) for s in acc], [full(0.0, s) for s in acc])


def through_batchnorm(aff: AffineSteps, bn) -> AffineSteps | None:
    """The affine form after an eval BatchNorm over dim 1 of each step (None when BN is not a fixed affine)."""
    if bn.training or bn.running_mean is None or bn.running_var is None or aff[0].dim() < 2 \
            or aff[0].shape[1] != bn.num_features:
        return None
    with untraced():
        g = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        if bn.weight is not None:
            g = g * bn.weight.detach().double()
        shift = -bn.running_mean.detach().double() * g
        if bn.bias is not None:
            shift = shift + bn.bias.detach().double()
        shape = (1, -1) + (1,) * (aff[0].dim() - 2)
        g, shift = g.view(shape), shift.view(shape)
        return AffineSteps(list(aff), [a * g for a in aff.alpha], [b * g + shift for b in aff.beta])


def scaled_per_step(aff: AffineSteps, factors: list) -> AffineSteps:
    """The affine form times a per-step factor (the attention's λ_t), broadcast as the values are."""
    with untraced():
        f = [v.detach().double() for v in factors]
        return AffineSteps(list(aff), [(a * v).expand(a.shape).clone() for a, v in zip(aff.alpha, f)],
                           [(b * v).expand(b.shape).clone() for b, v in zip(aff.beta, f)])


def why_not(module) -> str | None:
    """None when this neuron's membrane has an exact integer form here, else the reason in a few words."""
    from ..nn.lif import IF, LIF
    if isinstance(module, IF):
        return "an IF neuron (no decay)"
    cls = type(module)
    if any(getattr(cls, f) is not getattr(LIF, f) for f in ("charge", "reset_membrane", "initial_membrane")):
        return f"{cls.__name__} computes its own charge or reset"
    if float(module.tau) != 2.0:
        return f"tau = {module.tau:g} (only tau = 2 is a shift)"
    if not module.decay_input:
        return "decay_input = False"
    if module.v_reset is not None and float(module.v_reset) != 0.0:
        return f"v_reset = {module.v_reset:g}"
    return None


def _minimal(a: np.ndarray) -> np.ndarray:
    """`a` shrunk to size 1 along every axis it is constant on (the smallest broadcastable constant)."""
    for d in range(a.ndim):
        first = np.take(a, [0], axis=d)
        if a.shape[d] > 1 and np.array_equal(np.broadcast_to(first, a.shape), a):
            a = first
    return a


def _const(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(_minimal(a)), dtype=torch.float32)


def _ceil(v: np.ndarray) -> np.ndarray:
    return np.clip(np.ceil(v), -CLIP, CLIP)


def integer_lif(module, x: AffineSteps, fire) -> tuple[list | None, str]:
    """(spike per step, 'integer') for the integer membrane, or (None, reason) when it does not apply.

    `fire(z)` is the spike op (finn_unroll.SpikeThreshold: z >= 0 as a BINARY MultiThreshold)."""
    reason = why_not(module)
    if reason is not None:
        return None, reason
    with untraced():
        alpha = [a.numpy() for a in x.alpha]
        beta = [b.numpy() for b in x.beta]
    if not all(np.array_equal(alpha[0], a) and np.array_equal(beta[0], b) for a, b in zip(alpha, beta)):
        return None, "its input scale differs between time steps"
    alpha, beta = alpha[0], beta[0]
    if not (np.all(np.isfinite(alpha)) and np.all(np.isfinite(beta))):
        return None, "a non-finite input scale"
    vth = float(module.v_threshold)
    sigma = np.sign(alpha)
    safe = np.where(alpha == 0, 1.0, alpha)
    if module.v_reset is None:
        return _soft(x, alpha, beta, sigma, safe, vth, fire)
    T = len(x)
    spikes: list = []
    state = None
    onehot: list = []  # onehot[j]: last fired at step j + 1 (1-indexed), j + 1 < t
    sig = None if np.all(sigma == 1) else _const(sigma)
    for t in range(1, T + 1):
        a_t = x[t - 1]
        if t == 1:
            state = a_t
        else:
            keep = 1.0 - spikes[-1]
            onehot = [o * keep for o in onehot] + [spikes[-1]]
            state = state * keep + a_t * float(2 ** (t - 1))
        theta = []
        for r in range(t):
            big_r = float(2 ** t - 2 ** r)
            with np.errstate(all="ignore"):
                v = sigma * (2.0 ** t * vth - beta * big_r) / safe
            fires_anyway = np.where(beta * big_r >= 2.0 ** t * vth, 0.0, 1.0)
            theta.append(np.where(alpha == 0, fires_anyway, _ceil(v)))
        z = state if sig is None else state * sig
        z = z - _const(theta[0])
        for j, o in enumerate(onehot):
            step = theta[j + 1] - theta[0]
            if np.any(step != 0):
                z = z - o * _const(step)
        spikes.append(fire(z))
    return spikes, "integer"


def _soft(x: AffineSteps, alpha, beta, sigma, safe, vth: float, fire):
    c = vth / safe
    if np.any(alpha == 0) or not np.all(c == np.round(c)) or np.any(np.abs(c) > CLIP):
        return None, "a soft reset whose V_th is not an integer multiple of the input scale"
    sig = None if np.all(sigma == 1) else _const(sigma)
    cs = None if np.all(c == 1) else _const(c)
    spikes: list = []
    state = None
    for t in range(1, len(x) + 1):
        a_t = x[t - 1]
        if t == 1:
            state = a_t
        else:
            reset = spikes[-1] if cs is None else spikes[-1] * cs
            state = state + (a_t - reset) * float(2 ** (t - 1))
        theta = _ceil(sigma * (2.0 ** t * vth - beta * float(2 ** t - 1)) / safe)
        z = state if sig is None else state * sig
        spikes.append(fire(z - _const(theta)))
    return spikes, "integer"


def type_integer_constants(model) -> int:
    """Mark float initializers with integer values that feed an Add/Sub/Mul whose other input is integer-typed
    with the smallest integer DataType, and infer datatypes again, until nothing changes (the membrane's
    2^t shifts, thresholds and 1 − s); returns how many were marked."""
    from qonnx.core.datatype import DataType
    from qonnx.transformation.infer_datatypes import InferDataTypes

    marked = 0
    while True:
        changed = 0
        for node in model.graph.node:
            if node.op_type not in ("Add", "Sub", "Mul") or len(node.input) != 2:
                continue
            inits = [model.get_initializer(i) for i in node.input]
            for k in (0, 1):
                w, other = inits[k], node.input[1 - k]
                if w is None or inits[1 - k] is not None:
                    continue
                if model.get_tensor_datatype(node.input[k]) != DataType["FLOAT32"]:
                    continue
                if not model.get_tensor_datatype(other).is_integer():
                    continue
                if w.size == 0 or not np.all(np.isfinite(w)) or not np.all(w == np.round(w)):
                    continue
                lo, hi = float(w.min()), float(w.max())
                mag = hi if lo >= 0 else min(lo, -hi - 1, -2.0)  # -2: INT2, never BIPOLAR (which has no 0)
                model.set_tensor_datatype(node.input[k], DataType.get_smallest_possible(mag))
                changed += 1
        if not changed:
            return marked
        marked += changed
        infer = InferDataTypes()
        while infer.apply(model)[1]:  # in place, to its fixpoint
            pass


def lif_notes(lifs: dict[str, str]) -> list[str]:
    """One note on how many membranes are integer, and one per float membrane with its reason."""
    if not lifs:
        return []
    n = sum(how == "integer" for how in lifs.values())
    notes = [f"membranes: {n} of {len(lifs)} LIF neuron(s) integer (finn_lif.py), {len(lifs) - n} float"]
    notes += [f"membranes: {key} float: {how}" for key, how in lifs.items() if how != "integer"]
    return notes


def mark_layouts(model, spikes: dict, lifs: dict[str, str]) -> int:
    """Give the integer membranes' 4-D MultiThresholds `data_layout = NCHW` (what qonnx assumes for 4-D anyway),
    so that FINN's layout inference annotates their outputs and the Thresholding conversion transposes them to
    channels-last once Streamline has folded per-channel constants into their thresholds. Returns how many."""
    from qonnx.util.basic import get_by_name
    from onnx import helper

    names = {n for key, (steps, _) in spikes.items() if lifs.get(key) == "integer" for n in steps}
    marked = 0
    for node in model.graph.node:
        if node.op_type != "MultiThreshold" or node.output[0] not in names:
            continue
        shape = model.get_tensor_shape(node.input[0])
        if shape is None or len(shape) != 4 or get_by_name(node.attribute, "data_layout") is not None:
            continue
        node.attribute.append(helper.make_attribute("data_layout", "NCHW"))
        marked += 1
    return marked
