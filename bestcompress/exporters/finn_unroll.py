"""The FINN-ready graph: a binary model's time steps unrolled as separate batch-1 streams, spikes as BINARY
MultiThresholds and 1-bit weights as plain ±1 tensors, ready for FINN's MVAU conversion.

The generic QONNX export runs convolutions on a T·B-merged batch and fires spikes through `BipolarQuant` (then
×½ + ½), so FINN sees neither a batch-1 convolution nor a BINARY stream. Here the binary model's fx graph is
executed by `StepInterpreter` with every time-dependent value held as a list of T per-step tensors (`Steps`,
each [B, ...]), and that execution is traced by the ONNX exporter:

- convolutions, linears and BatchNorms run once per step (batch B = 1 in the exported graph);
- every LIF runs its own `charge` / `reset_membrane` per step, so the membrane is threaded from step to step in
  the graph, and fires through `SpikeThreshold`, exported as `MultiThreshold(h, [[V_th]], out_dtype=BINARY)`:
  h >= V_th, the Heaviside's convention, gives exactly the {0, 1} spike PyTorch computes;
- a 1-bit layer multiplies by its sign matrix (values ±1, marked BIPOLAR after export) and then by its
  per-channel scale α_c (when it has one) and adds its bias: the MatMul itself is integer × binary;
- a spike map scaled by a power of two before a MatMul (the attention's ×0.125) is scaled after it instead:
  the same float result bit for bit, and the MatMul keeps two BINARY operands (a dynamic MVAU in FINN+).

Anything the interpreter does not know how to split per step (an op over the time axis, an unknown module
fed by a time-dependent value) is run on the stacked [T, ...] tensor and split again; each such fallback is
recorded, so the report can say why a node stayed a software node.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..nn.binary import is_binary_layer
from ..nn.lif import LIF
from .finn_layer_ops import binary_layer, channel_shape, float_conv, sign_and_scale
from .finn_steps import Scaled, Steps, flat_args, map_steps

SPIKE_DOMAIN = "qonnx.custom_op.general"


class SpikeThreshold(torch.autograd.Function):
    """(h >= V_th) as 0/1; exported as a BINARY-output MultiThreshold with one threshold."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, v_threshold: float) -> torch.Tensor:
        return (h >= v_threshold).to(h.dtype)

    @staticmethod
    def symbolic(g, h, v_threshold: float):
        thr = g.op("Constant", value_t=torch.tensor([[float(v_threshold)]], dtype=torch.float32))
        out = g.op(f"{SPIKE_DOMAIN}::MultiThreshold", h, thr, out_dtype_s="BINARY")
        out.setType(h.type())
        return out


@dataclass
class UnrollLog:
    """What the interpreter did: the spike calls in execution order, fallbacks, binary layer calls."""

    spikes: list[tuple[str, int, str]] = field(default_factory=list)  # (neuron key, step, kind)
    fallbacks: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    lifs: dict[str, str] = field(default_factory=dict)  # neuron key -> 'integer' or why its membrane is float


def _power_of_two(c) -> bool:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or c == 0 or not math.isfinite(c):
        return False
    m, _ = math.frexp(abs(float(c)))
    return m == 0.5


def _map_dim(d: int, kind: str) -> int | None:
    """A dim of the full tensor as a dim of one step (None: it is the time / merged axis)."""
    if d < 0:
        return d
    if kind == "tf":
        return None if d == 0 else d - 1
    return None if d == 0 else d


class StepInterpreter(fx.Interpreter):
    """Runs a binary model's fx graph with time-dependent values as `Steps` (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, T: int, log: UnrollLog, weights: dict) -> None:
        super().__init__(gm)
        self.T = T
        self.log = log
        self.weights = weights
        self.names = {id(m): n for n, m in gm.named_modules()}

    # ------------------------------------------------------------------------------- helpers
    def _value(self, a):
        return a.value() if isinstance(a, Scaled) else a

    def _fallback(self, what: str, fn, args, kwargs):
        """Run fn on stacked tensors; split the result again when its leading axis is the time axis."""
        kinds = [a.kind for a in flat_args(args, kwargs) if isinstance(a, Steps)]
        self.log.fallbacks.append(what)
        args, kwargs = map_steps(lambda a: a.stacked() if isinstance(a, Steps) else a, args, kwargs)
        out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor) and kinds and out.dim() > 0:
            kind = kinds[0]
            if kind == "tf" and out.shape[0] == self.T:
                return Steps(list(out.unbind(0)), "tf")
            if kind == "tb" and out.shape[0] % self.T == 0:
                return Steps(list(out.chunk(self.T, 0)), "tb")
        return out

    def _per_step(self, fn, args, kwargs, kind: str):
        def pick(a, t):
            if isinstance(a, Steps):
                return a[t]
            if isinstance(a, torch.Tensor) and kind == "tf" and a.dim() > 0 and a.dim() == ref_dim + 1:
                return a[0] if a.shape[0] == 1 else a[t]
            return a
        ref = next(a for a in flat_args(args, kwargs) if isinstance(a, Steps))
        ref_dim = ref[0].dim()
        return Steps([fn(*map_steps(lambda a: pick(a, t), args, kwargs)[0],
                         **map_steps(lambda a: pick(a, t), args, kwargs)[1]) for t in range(self.T)], kind)

    # ------------------------------------------------------------------------------- fx hooks
    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        args, kwargs = map_steps(self._value, args, kwargs)
        steps = [a for a in flat_args(args, kwargs) if isinstance(a, Steps)]
        if not steps:
            return module(*args, **kwargs)
        k = self.log.calls.get(target, 0)
        self.log.calls[target] = k + 1
        key = target if k == 0 else f"{target}#{k}"
        x = args[0] if args else None
        if _is_step_lif(module):
            if isinstance(x, Steps) and len(args) == 1 and not kwargs and getattr(module, "step_mode", "m") == "m":
                return self._lif(module, x, key)
        if is_binary_layer(module) and isinstance(x, Steps) and len(args) == 1:
            return self._binary(module, self.weights[target], x)
        if type(module) is nn.Conv1d and isinstance(x, Steps) and x.kind == "tb" and len(args) == 1:
            return Steps([float_conv(module, s) for s in x], "tb")
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool1d, nn.MaxPool2d,
                               nn.AvgPool2d, nn.Identity, nn.Dropout)) and isinstance(x, Steps) \
                and x.kind == "tb" and len(args) == 1:
            return self._keep_forms(module, Steps([module(s) for s in x], "tb"), x)
        if isinstance(module, (nn.Linear, nn.Identity, nn.Dropout, nn.LayerNorm)) and len(args) == 1:
            return Steps([module(s) for s in x], x.kind)
        from ..nn.attention import AttentionScale
        from ..nn.reversible import ReversibleCoupling
        if isinstance(module, AttentionScale) and type(module).forward is AttentionScale.forward:
            out = Steps([s * module.lam[t] for t, s in enumerate(x)], x.kind)
            if x.affine is not None:
                from .finn_lif import scaled_per_step
                out.affine = scaled_per_step(x.affine, [module.lam[t] for t in range(len(x))])
            return out
        if isinstance(module, ReversibleCoupling) and all(isinstance(a, Steps) for a in args):
            return self._per_step(module, args, kwargs, args[0].kind)
        return self._fallback(f"module {key} ({type(module).__name__})", module, args, kwargs)

    def _lif(self, module: LIF, x: Steps, key: str) -> Steps:
        from .finn_lif import integer_lif, scaled_integers
        aff = x.affine
        if aff is None and x.integer:
            aff = scaled_integers(list(x), 1.0)
        if aff is not None:
            spikes, how = integer_lif(module, aff, lambda z: SpikeThreshold.apply(z, 0.0))
        else:
            spikes, how = None, "its input is not α·A + β of a 1-bit layer's integer accumulator A"
        self.log.lifs[key] = how
        if spikes is not None:
            self.log.spikes.extend((key, t, x.kind) for t in range(len(spikes)))
            return Steps(spikes, x.kind, integer=True)
        v = module.initial_membrane(x[0])
        out = []
        for t, xt in enumerate(x):
            h = module.charge(v, xt)
            s = SpikeThreshold.apply(h, float(module.v_threshold))
            self.log.spikes.append((key, t, x.kind))
            v = module.reset_membrane(h, s)
            out.append(s)
        return Steps(out, x.kind, integer=True)

    def _binary(self, module, weights: tuple, x: Steps) -> Steps:
        """The 1-bit layer per step; on integer input, its output also as α·A + b of the accumulators A."""
        from .finn_lif import affine_of_layer
        outs = [binary_layer(module, weights, s) for s in x]
        y = Steps([o for o, _ in outs], x.kind)
        if x.integer:
            acc = [a for _, a in outs]
            y.affine = affine_of_layer(acc, weights[1], module.bias, channel_shape(module, acc[0].dim()))
        return y

    @staticmethod
    def _keep_forms(module, out: Steps, x: Steps) -> Steps:
        """Integer values stay integer through max-pooling / identities; an affine form passes an eval BatchNorm."""
        from .finn_lif import through_batchnorm
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.Identity, nn.Dropout)):
            out.integer = x.integer
            out.affine = x.affine
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and x.affine is not None:
            out.affine = through_batchnorm(x.affine, module)
        return out

    def call_function(self, target, args, kwargs):
        if target is operator.mul and not kwargs:
            a, b = args
            if isinstance(a, Steps) and _power_of_two(b):
                return Scaled(a, float(b))
            if isinstance(b, Steps) and _power_of_two(a):
                return Scaled(b, float(a))
        if target in (operator.matmul, torch.matmul) and not kwargs:
            a, b = args
            if isinstance(a, Scaled) or isinstance(b, Scaled):
                fa = a.factor if isinstance(a, Scaled) else 1.0
                fb = b.factor if isinstance(b, Scaled) else 1.0
                a = a.steps if isinstance(a, Scaled) else a
                b = b.steps if isinstance(b, Scaled) else b
                prod = self.call_function(target, (a, b), {})
                out = Steps([p * (fa * fb) for p in prod], prod.kind)
                if prod.integer:
                    from .finn_lif import scaled_integers
                    out.affine = scaled_integers(list(prod), fa * fb)
                return out
        args, kwargs = map_steps(self._value, args, kwargs)
        if target is getattr and isinstance(args[0], Steps):
            if args[1] == "shape":
                return torch.Size(args[0].fake_shape())
            return getattr(args[0][0], args[1])
        steps = [a for a in flat_args(args, kwargs) if isinstance(a, Steps)]
        if not steps:
            return target(*args, **kwargs)
        if target in _POINTWISE:
            kinds = {s.kind for s in steps}
            if len(kinds) == 1:
                out = self._per_step(target, args, kwargs, steps[0].kind)
                out.integer = target in _INTEGER_OPS and all(
                    a.integer if isinstance(a, Steps) else _is_int(a) for a in flat_args(args, kwargs))
                return out
        return self._fallback(f"function {getattr(target, '__name__', target)}", target, args, kwargs)

    def call_method(self, target, args, kwargs):
        args, kwargs = map_steps(self._value, args, kwargs)
        this = args[0]
        if not isinstance(this, Steps):
            if target == "unsqueeze" and isinstance(this, torch.Tensor) and _arg(args, kwargs, 1, "dim") == 0:
                return Steps([this], "tf")
            if any(isinstance(a, Steps) for a in flat_args(args, kwargs)):
                return self._fallback(f"method {target}", lambda s, *a, **k: getattr(s, target)(*a, **k),
                                      args, kwargs)
            return getattr(this, target)(*args[1:], **kwargs)
        done = self._method(this, target, list(args[1:]), kwargs)
        if done is not None:
            if isinstance(done, Steps) and target in _SHAPE_METHODS:
                done.integer = this.integer
                if this.affine is not None:
                    done.affine = self._affine_method(this.affine, this.kind, target, list(args[1:]), kwargs)
            return done
        return self._fallback(f"method {target}", lambda s, *a, **k: getattr(s, target)(*a, **k), args, kwargs)

    def _affine_method(self, aff, kind: str, target: str, rest: list, kwargs: dict):
        """The same shape op on an affine form's accumulators and on its (untraced) α and β."""
        from .finn_lif import AffineSteps, untraced
        acc = self._method(Steps(list(aff), kind), target, rest, kwargs)
        with untraced():
            alpha = self._method(Steps(aff.alpha, kind), target, rest, kwargs)
            beta = self._method(Steps(aff.beta, kind), target, rest, kwargs)
        if acc is None or alpha is None or beta is None or len(acc) != len(alpha):
            return None
        return AffineSteps(list(acc), list(alpha), list(beta))

    def _method(self, x: Steps, target: str, rest: list, kwargs: dict):
        T, kind = self.T, x.kind
        if target == "repeat" and kind == "tf" and len(x) == 1:
            reps = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            if reps and reps[0] == T and all(r == 1 for r in reps[1:]):
                return Steps([x[0]] * T, "tf")
            return None
        if len(x) != T:
            return None
        if target in ("contiguous", "float", "clone", "detach"):
            return Steps([getattr(s, target)() for s in x], kind)
        if target in _POINTWISE_METHODS:
            return self._per_step(lambda s, *a, **k: getattr(s, target)(*a, **k), [x] + rest, kwargs, kind)
        if target == "flatten":
            start = _arg([None] + rest, kwargs, 1, "start_dim", 0)
            end = _arg([None] + rest, kwargs, 2, "end_dim", -1)
            if kind == "tf" and start == 0 and end == 1:
                return Steps(list(x), "tb")
            a, b = _map_dim(start, kind), _map_dim(end, kind)
            if a is None or b is None:
                return None
            return Steps([s.flatten(a, b) for s in x], kind)
        if target in ("reshape", "view"):
            shape = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
            B = x[0].shape[0]
            if kind == "tb" and len(shape) >= 2 and shape[0] == T and shape[1] in (B, -1):
                return Steps([s.reshape(B, *shape[2:]) for s in x], "tf")
            if kind == "tf" and shape and shape[0] == T:
                return Steps([s.reshape(*shape[1:]) for s in x], "tf")
            if kind == "tb" and shape and shape[0] == T * B:
                return Steps([s.reshape(B, *shape[1:]) for s in x], "tb")
            return None
        if target in ("transpose", "permute"):
            dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            mapped = [_map_dim(d, kind) for d in dims]
            if target == "permute" and kind == "tf" and dims and dims[0] == 0:
                mapped = [_map_dim(d, kind) for d in dims[1:]]
            elif target == "permute" and kind == "tb" and dims and dims[0] == 0:
                mapped = [0] + mapped[1:]
            if any(m is None for m in mapped):
                return None
            return Steps([getattr(s, target)(*mapped) for s in x], kind)
        if target in ("mean", "sum"):
            dim = _arg([None] + rest, kwargs, 1, "dim")
            keep = _arg([None] + rest, kwargs, 2, "keepdim", False)
            if isinstance(dim, int) and not keep:
                d = _map_dim(dim, kind)
                if d is not None:
                    return Steps([getattr(s, target)(d) for s in x], kind)
                if kind == "tf":  # over time: the steps' sum (mean: divided by T, as torch.mean does)
                    total = x[0]
                    for s in x[1:]:
                        total = total + s
                    return total / T if target == "mean" else total
            return None
        if target in ("matmul",):
            return self._per_step(lambda s, o: s.matmul(o), [x] + rest, kwargs, kind)
        return None


_POINTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.matmul,
              torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.sigmoid, torch.relu, torch.neg}
_INTEGER_OPS = {operator.add, operator.sub, operator.mul, operator.neg, operator.matmul, torch.add, torch.sub,
                torch.mul, torch.neg, torch.matmul}  # integer operands (Python ints included) give integers
_SHAPE_METHODS = {"contiguous", "float", "clone", "detach", "flatten", "reshape", "view", "transpose", "permute"}
_POINTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "__add__", "__mul__", "__sub__", "__truediv__"}


def _is_int(a) -> bool:
    return isinstance(a, int) and not isinstance(a, bool)


def _is_step_lif(module) -> bool:
    """Our LIF (or IF, or an attention-map neuron) whose forward is the multi-step loop over charge/fire/reset."""
    from ..nn.attention import AttentionMapNeuron
    if not isinstance(module, LIF):
        return False
    cls = type(module)
    if any(k in module.__dict__ for k in ("charge", "reset_membrane", "forward")):
        return False
    if cls.fire is not LIF.fire:
        return False
    return cls.forward in (LIF.forward, AttentionMapNeuron.forward)


def _arg(args, kwargs, i: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


class UnrolledModel(nn.Module):
    """The binary model run by StepInterpreter (what the ONNX exporter traces); returns the logits."""

    def __init__(self, gm: fx.GraphModule, T: int) -> None:
        super().__init__()
        self.gm = gm
        self.T = T
        self.log = UnrollLog()
        self.weights = {n: sign_and_scale(m) for n, m in gm.named_modules() if is_binary_layer(m)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .verify import logits_of
        self.log = UnrollLog()
        out = StepInterpreter(self.gm, self.T, self.log, self.weights).run(x)
        if isinstance(out, Scaled):
            out = out.value()
        if isinstance(out, Steps):
            out = out.stacked()
        return logits_of(out)
