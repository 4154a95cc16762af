"""CanonicalizeNeurons: third-party spiking neurons -> bestcompress neurons with the same dynamics, verified.

Conversion rules are data (`NEURON_RULES`): each names the third-party class it matches and builds the
canonical module from the object's own settings (tau, v_threshold, v_reset, decay_input, detach_reset,
surrogate). Every swap is checked on random input before it is made: the spikes must be exactly equal and
the surrogate gradients equal to float tolerance; otherwise the original neuron stays and a note says why.

Covered:
- spikingjelly (activation_based, 2.x): LIFNode, IFNode, ParametricLIFNode in step_mode 'm' -> LIF, IF,
  ParametricLIF (stateless multi-step); in step_mode 's' -> the same classes with step_mode='s' (the membrane
  is kept between calls until reset(), which spikingjelly's functional.reset_net calls).
- legacy spikingjelly (clock_driven, 0.0.0.0.x): MultiStepLIFNode / MultiStepIFNode / MultiStepParametricLIFNode
  and the single-step LIFNode / IFNode / ParametricLIFNode, recognised by class and attribute names.
- snntorch Leaky -> bestcompress.nn.leaky.Leaky (snntorch's update order, strict threshold, ATan or sigmoid
  surrogate), with explicit state (init_hidden=False: the membrane the model passes is never stored) or with
  hidden state (init_hidden=True: kept in the neuron; `utils.reset(self)` or `reset_mem()` inside a forward is
  replayed by the traced graph, and bestcompress.nn.state.reset_state clears it between batches).
- norse LIFBoxCell -> bestcompress.nn.norse_lif.BoxLIFCell (norse's equations, strict threshold, SuperSpike
  surrogate, `z, state = cell(x, state)`); norse LIFCell -> CurrentLIFCell and norse LIF -> CurrentLIF (the
  synaptic current kept as a second state variable; LIF runs over the leading time axis).
Kept, with a note: every other snntorch, norse (recurrent, adaptive, ...) and sinabs neuron, and any setting
without a canonical form (other surrogates, norse's adjoint method, state quantization, ...).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..nn.leaky import Leaky
from ..nn.lif import IF, LIF, ParametricLIF
from ..nn.norse_lif import BoxLIFCell, CurrentLIFCell
from ..trace import is_neuron
from .base import Pass, PassContext, PassError, register_pass
from .neuron_check import verify_swap

CANONICAL_NEURONS = (LIF, Leaky, BoxLIFCell, CurrentLIFCell)


class Unsupported(Exception):
    """The neuron has a setting the canonical form cannot reproduce (the message says which)."""


# ------------------------------------------------------------------------------------------- reading settings

def _float(value, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise Unsupported(f"{what} is a tensor of shape {tuple(value.shape)}, not a scalar")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise Unsupported(f"{what} is {value!r}, not a number") from None


def _spikingjelly_surrogate(fn) -> tuple[str, float]:
    """('sigmoid' | 'atan', alpha) of a spikingjelly surrogate module, or Unsupported."""
    name = type(fn).__name__
    if not getattr(fn, "spiking", True):
        raise Unsupported(f"its surrogate {name} has spiking=False (the neuron does not emit spikes)")
    if name in ("Sigmoid", "ATan") and type(fn).__module__.startswith("spikingjelly"):
        return name.lower(), _float(getattr(fn, "alpha"), "surrogate alpha")
    raise Unsupported(f"its surrogate gradient {name} has no canonical form (sigmoid and atan do)")


def _snntorch_surrogate(neuron) -> tuple[str, float]:
    fn = neuron.spike_grad
    if getattr(neuron, "surrogate_disable", False):
        raise Unsupported("surrogate_disable=True (no surrogate gradient) has no canonical form")
    qual = getattr(fn, "__qualname__", "")
    kind = {"atan.<locals>.inner": "atan", "sigmoid.<locals>.inner": "sigmoid"}.get(qual)
    if kind is None or not getattr(fn, "__module__", "").startswith("snntorch"):
        raise Unsupported(f"its spike_grad {qual or fn!r} has no canonical form (atan and sigmoid do)")
    free = inspect.getclosurevars(fn).nonlocals
    return kind, _float(free["alpha" if kind == "atan" else "slope"], "surrogate slope")


def _common_sj(m: nn.Module) -> dict:
    surrogate, alpha = _spikingjelly_surrogate(m.surrogate_function)
    v_reset = getattr(m, "v_reset", 0.0)
    return dict(v_threshold=_float(m.v_threshold, "v_threshold"),
                v_reset=None if v_reset is None else _float(v_reset, "v_reset"),
                detach_reset=bool(getattr(m, "detach_reset", False)), alpha=alpha, surrogate=surrogate)


def _check_sj_options(m: nn.Module) -> None:
    if getattr(m, "store_v_seq", False):
        raise Unsupported("store_v_seq=True (the canonical neuron does not record v_seq)")
    if getattr(m, "_neuron_precision", None) is not None:
        raise Unsupported("a reduced neuron precision is set")


def _step_mode(m: nn.Module, legacy_multi: bool | None) -> str:
    if legacy_multi is not None:
        return "m" if legacy_multi else "s"
    mode = getattr(m, "step_mode", "s")
    if mode not in ("s", "m"):
        raise Unsupported(f"step_mode={mode!r}")
    return mode


def _keep_single_step_state(new: LIF, old: nn.Module) -> LIF:
    v = getattr(old, "v", None)
    if new.step_mode == "s" and isinstance(v, torch.Tensor):
        new.v = v.detach().clone()
    return new


def _to_lif(m: nn.Module, legacy_multi: bool | None = None) -> nn.Module:
    _check_sj_options(m)
    tau = _float(m.tau, "tau")
    if tau <= 1.0:
        raise Unsupported(f"tau={tau} is not > 1")
    new = LIF(tau=tau, decay_input=bool(getattr(m, "decay_input", True)), step_mode=_step_mode(m, legacy_multi),
              **_common_sj(m))
    return _keep_single_step_state(new, m)


def _to_if(m: nn.Module, legacy_multi: bool | None = None) -> nn.Module:
    _check_sj_options(m)
    return _keep_single_step_state(IF(step_mode=_step_mode(m, legacy_multi), **_common_sj(m)), m)


def _to_plif(m: nn.Module, legacy_multi: bool | None = None) -> nn.Module:
    _check_sj_options(m)
    w = getattr(m, "w", None)
    if not isinstance(w, torch.Tensor) or w.numel() != 1:
        raise Unsupported("its learnable w is not a scalar parameter")
    new = ParametricLIF(decay_input=bool(getattr(m, "decay_input", True)), step_mode=_step_mode(m, legacy_multi),
                        **_common_sj(m))
    with torch.no_grad():
        new.w = nn.Parameter(w.detach().clone().reshape(new.w.shape).to(w.dtype), requires_grad=w.requires_grad)
    return _keep_single_step_state(new, m)


def _norse_method(p) -> str:
    method = getattr(p, "method", "super")
    if method not in ("super", "heaviside"):
        raise Unsupported(f"its threshold method {method!r} has no canonical form (super and heaviside do)")
    return method


def _to_box_lif(m: nn.Module) -> nn.Module:
    p = m.p
    method = _norse_method(p)
    reset_fn = getattr(getattr(p, "reset_method", None), "__name__", "reset_value")
    reset = {"reset_value": "value", "reset_subtract": "subtract"}.get(reset_fn)
    if reset is None:
        raise Unsupported(f"its reset method {reset_fn} has no canonical form")
    return BoxLIFCell(tau_mem_inv=_float(p.tau_mem_inv, "tau_mem_inv"), v_leak=_float(p.v_leak, "v_leak"),
                      v_th=_float(p.v_th, "v_th"), v_reset=_float(p.v_reset, "v_reset"), dt=_float(m.dt, "dt"),
                      reset=reset, surrogate=method)


def _to_current_lif(m: nn.Module) -> nn.Module:
    from ..nn.norse_lif import CurrentLIF
    p = m.p
    if getattr(m, "record_states", False):
        raise Unsupported("record_states=True (the canonical neuron returns the last state only)")
    cls = CurrentLIF if type(m).__name__ == "LIF" else CurrentLIFCell
    return cls(tau_syn_inv=_float(p.tau_syn_inv, "tau_syn_inv"), tau_mem_inv=_float(p.tau_mem_inv, "tau_mem_inv"),
               v_leak=_float(p.v_leak, "v_leak"), v_th=_float(p.v_th, "v_th"), v_reset=_float(p.v_reset, "v_reset"),
               dt=_float(m.dt, "dt"), surrogate=_norse_method(p))


def _to_leaky(m: nn.Module) -> nn.Module:
    if getattr(m, "inhibition", False):
        raise Unsupported("inhibition=True has no canonical form")
    if getattr(m, "state_quant", False):
        raise Unsupported("state_quant is set (quantized membrane) and has no canonical form")
    surrogate, alpha = _snntorch_surrogate(m)
    params = dict(m.named_parameters(recurse=False))
    new = Leaky(beta=m.beta, threshold=m.threshold, reset_mechanism=m.reset_mechanism,
                reset_delay=bool(getattr(m, "reset_delay", True)), init_hidden=bool(m.init_hidden),
                output=bool(m.output),
                graded_spikes_factor=m.graded_spikes_factor, learn_beta="beta" in params,
                learn_threshold="threshold" in params, learn_graded_spikes_factor="graded_spikes_factor" in params,
                surrogate=surrogate, alpha=alpha)
    if isinstance(getattr(m, "mem", None), torch.Tensor):
        new.mem = m.mem.detach().clone()
    return new


# ------------------------------------------------------------------------------------------------ rule table

@dataclass(frozen=True)
class NeuronRule:
    """How one third-party neuron class becomes a bestcompress neuron."""

    name: str
    matches: Callable[[nn.Module], bool]
    convert: Callable[[nn.Module], nn.Module]  # raises Unsupported(reason)


def _sj_class(attr: str):
    try:
        from spikingjelly.activation_based import neuron
    except Exception:  # spikingjelly absent, or a layout without activation_based
        return None
    return getattr(neuron, attr, None)


def _is_sj(attr: str) -> Callable[[nn.Module], bool]:
    def matches(m: nn.Module) -> bool:
        cls = _sj_class(attr)
        return cls is not None and isinstance(m, cls)
    return matches


def _is_legacy(cls_name: str, needs: tuple[str, ...]) -> Callable[[nn.Module], bool]:
    # spikingjelly 0.0.0.0.x (clock_driven) is not importable next to 2.x: recognise it by names.
    def matches(m: nn.Module) -> bool:
        return (type(m).__name__ == cls_name and ".clock_driven." in f".{type(m).__module__}."
                and all(hasattr(m, a) for a in needs))
    return matches


def _is_snntorch_leaky(m: nn.Module) -> bool:
    try:
        import snntorch
    except Exception:  # snntorch absent
        return False
    return type(m) is snntorch.Leaky


def _is_norse_box_cell(m: nn.Module) -> bool:
    # norse.torch.LIFBoxCell (recognised by name: norse is optional); its parameters are a LIFBoxParameters tuple
    p = getattr(m, "p", None)
    return (type(m).__name__ == "LIFBoxCell" and type(m).__module__.startswith("norse.") and hasattr(m, "dt")
            and all(hasattr(p, f) for f in ("tau_mem_inv", "v_leak", "v_th", "v_reset")))


def _is_norse_lif(cls_name: str) -> Callable[[nn.Module], bool]:
    # norse.torch.LIFCell / norse.torch.LIF (by name: norse is optional); parameters in a LIFParameters tuple
    def matches(m: nn.Module) -> bool:
        p = getattr(m, "p", None)
        return (type(m).__name__ == cls_name and type(m).__module__.startswith("norse.") and hasattr(m, "dt")
                and all(hasattr(p, f) for f in ("tau_syn_inv", "tau_mem_inv", "v_leak", "v_th", "v_reset")))
    return matches


_SJ_NEEDS = ("v_threshold", "v_reset", "surrogate_function", "detach_reset")

NEURON_RULES: list[NeuronRule] = [
    # Exact classes before their bases: ParametricLIFNode and LIFNode are separate spikingjelly classes.
    NeuronRule("spikingjelly ParametricLIFNode", _is_sj("ParametricLIFNode"), _to_plif),
    NeuronRule("spikingjelly LIFNode", _is_sj("LIFNode"), _to_lif),
    NeuronRule("spikingjelly IFNode", _is_sj("IFNode"), _to_if),
    NeuronRule("spikingjelly (legacy) MultiStepParametricLIFNode",
               _is_legacy("MultiStepParametricLIFNode", _SJ_NEEDS + ("w",)), lambda m: _to_plif(m, True)),
    NeuronRule("spikingjelly (legacy) MultiStepLIFNode",
               _is_legacy("MultiStepLIFNode", _SJ_NEEDS + ("tau",)), lambda m: _to_lif(m, True)),
    NeuronRule("spikingjelly (legacy) MultiStepIFNode",
               _is_legacy("MultiStepIFNode", _SJ_NEEDS), lambda m: _to_if(m, True)),
    NeuronRule("spikingjelly (legacy) ParametricLIFNode",
               _is_legacy("ParametricLIFNode", _SJ_NEEDS + ("w",)), lambda m: _to_plif(m, False)),
    NeuronRule("spikingjelly (legacy) LIFNode", _is_legacy("LIFNode", _SJ_NEEDS + ("tau",)),
               lambda m: _to_lif(m, False)),
    NeuronRule("spikingjelly (legacy) IFNode", _is_legacy("IFNode", _SJ_NEEDS), lambda m: _to_if(m, False)),
    NeuronRule("snntorch Leaky", _is_snntorch_leaky, _to_leaky),
    NeuronRule("norse LIFBoxCell", _is_norse_box_cell, _to_box_lif),
    NeuronRule("norse LIFCell", _is_norse_lif("LIFCell"), _to_current_lif),
    NeuronRule("norse LIF", _is_norse_lif("LIF"), _to_current_lif),
]


def _foreign_neuron(module: nn.Module) -> bool:
    """A spiking neuron of a library we do not convert (noted, never silently left)."""
    if isinstance(module, CANONICAL_NEURONS):
        return False
    mod, name = type(module).__module__, type(module).__name__
    if mod.startswith("norse."):  # norse neuron modules (LIF, LIFCell, LIFBox, LSNN, ...), not every module
        return is_neuron(module) or "LIF" in name or "LSNN" in name or name.endswith("Cell")
    if mod.startswith("sinabs."):
        return is_neuron(module)
    if mod.startswith("snntorch"):
        try:
            import snntorch
            return isinstance(module, snntorch.SpikingNeuron)
        except Exception:  # pragma: no cover - snntorch half-installed
            return False
    if mod.startswith("spikingjelly"):
        return type(module).__name__.endswith("Node")
    return False


def _no_rule_reason(module: nn.Module) -> str:
    name = type(module).__name__
    if type(module).__module__.startswith("norse."):
        return (f"norse {name} has no canonical form in bestcompress (LIFBoxCell, LIFCell and LIF have; "
                "recurrent, adaptive and other norse neurons do not)")
    return f"{name} has no canonical form in bestcompress"


# ------------------------------------------------------------------------------------------------------ pass

def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Point every attribute that holds `old` (a neuron may be shared) at `new`; returns the names."""
    names = []
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent._modules.items()):
            if child is old:
                parent._modules[attr] = new
                names.append(f"{parent_name}.{attr}" if parent_name else attr)
    return names


def _invalidate_spikingjelly_reset_cache(model: nn.Module) -> None:
    try:
        from spikingjelly.activation_based.functional import invalidate_reset_cache
    except Exception:  # absent or an older spikingjelly without the cache
        return
    try:
        invalidate_reset_cache(model)
    except Exception:  # pragma: no cover - an unhashable model is never cached
        pass


@register_pass
class CanonicalizeNeurons(Pass):
    """Replace spikingjelly/snntorch neurons by bestcompress neurons with the same dynamics, verified equal.

    Requires: an nn.Module (module tree; runs before tracing).
    Ensures: every third-party neuron that a rule in NEURON_RULES converts is replaced, at every place it is
    referenced, by a bestcompress neuron (LIF, IF, ParametricLIF, Leaky) whose spikes on seeded random input
    equal the original's exactly and whose surrogate gradients match; every neuron left in place (no rule, a
    setting without canonical form, or a failed check) is named in a note. Applying it twice equals once.
    """

    switch = "neurons.canonicalize"

    def __init__(self, ctx: PassContext | None = None, time_steps: int = 6, seed: int = 0,
                 check_gradients: bool = True, rules: list[NeuronRule] | None = None) -> None:
        super().__init__(ctx)
        self.time_steps = int(time_steps)
        self.seed = int(seed)
        self.check_gradients = bool(check_gradients)
        self.rules = list(NEURON_RULES if rules is None else rules)
        self.replaced: dict[str, str] = {}  # qualname -> rule name
        self.kept: dict[str, str] = {}  # qualname -> reason
        self._stateless = False  # a stateful multi-step neuron became a stateless one

    def _rule(self, module: nn.Module) -> NeuronRule | None:
        if isinstance(module, CANONICAL_NEURONS):
            return None
        return next((r for r in self.rules if r.matches(module)), None)

    def apply(self, model: nn.Module) -> nn.Module:
        self.replaced, self.kept, self._stateless = {}, {}, False
        seen: set[int] = set()
        for name, module in list(model.named_modules()):
            if id(module) in seen:
                continue
            seen.add(id(module))
            rule = self._rule(module)
            if rule is None:
                if _foreign_neuron(module):
                    self.kept[name] = _no_rule_reason(module)
                continue
            if not name:
                self.kept["<root>"] = "the model itself is a neuron; nothing to replace it in"
                continue
            try:
                new = rule.convert(module)
            except Unsupported as e:
                self.kept[name] = f"{rule.name}: {e}"
                continue
            new.train(module.training)
            why = verify_swap(module, new, self.time_steps, seed=self.seed, check_gradients=self.check_gradients)
            if why:
                self.kept[name] = f"{rule.name}: {why}"
                continue
            for where in _replace_everywhere(model, module, new):
                self.replaced[where] = rule.name
            self._stateless |= getattr(new, "step_mode", "m") == "m" and getattr(module, "step_mode", "m") == "m"
        if self.replaced:
            _invalidate_spikingjelly_reset_cache(model)
        self._write_notes()
        return model

    def _write_notes(self) -> None:
        if self.replaced:
            counts: dict[str, int] = {}
            for rule in self.replaced.values():
                counts[rule] = counts.get(rule, 0) + 1
            summary = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
            self.ctx.note(f"CanonicalizeNeurons: replaced {summary} by bestcompress neurons (verified equal on "
                          "random input).")
            if self._stateless:
                self.ctx.note("CanonicalizeNeurons: the canonical multi-step neurons start every forward from "
                              "rest, as spikingjelly's do after functional.reset_net; a spikingjelly model run "
                              "without reset_net between batches carried state over, and now does not.")
            if any("snntorch" in r for r in counts):
                self.ctx.note("CanonicalizeNeurons: the snntorch Leaky neurons became bestcompress Leaky "
                              "(single-step); a membrane the model passes is not stored, hidden state "
                              "(init_hidden) is cleared by bestcompress.nn.state.reset_state (the trainer calls "
                              "it per batch) or reset_mem(); snntorch.utils.reset outside the model no longer "
                              "reaches them.")
        for name, why in self.kept.items():
            self.ctx.note(f"CanonicalizeNeurons: kept '{name}' as it is ({why}).")

    def check(self, model: nn.Module) -> None:
        for name in self.replaced:
            if not isinstance(model.get_submodule(name), CANONICAL_NEURONS):
                raise PassError(f"CanonicalizeNeurons: '{name}' is not a bestcompress neuron after the swap.")
