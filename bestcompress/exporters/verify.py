"""Numerical verification of an export against PyTorch: the comparison library every format's check uses.

The exported artifact (run by a `GraphFn`) and the PyTorch model run on the same inputs, one batch at a time (only
one batch of inputs, outputs and spikes is held at once): real data from an .npz file (`x`) when given, else seeded
random inputs. Compared are the outputs (largest absolute difference; any NaN or Inf fails) and every neuron's
spikes (PyTorch forward hooks vs the graph tensor recorded at export), with the binary values checked.

Rounding ties. A membrane within float rounding of V_th can fire in one runtime and not in the other; run end to
end, that one flip changes everything downstream. So a graph runner may take PyTorch's spikes and feed them to
each neuron's consumers instead of the graph's own (`GraphFn(x, feeds)`, see `graph_check.cut_at_spikes`): each
neuron then computes from PyTorch's inputs, and a flip cannot cascade. A differing spike is then a rounding tie
when PyTorch's membrane was within `tie_eps` of the threshold at that step (or at an earlier step of the same
neuron and element: a hard reset carries the flip forward in time); every other differing spike fails.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import BestcompressError, DataError, ExportError, short_reason
from .report import DEFAULT_SAMPLES, DEFAULT_TOLERANCE, TIE_EPS, NeuronCheck, VerifyReport

__all__ = ["DEFAULT_SAMPLES", "DEFAULT_TOLERANCE", "TIE_EPS", "GraphFn", "NeuronCheck", "NeuronRecorder",
           "VerifyReport", "compare", "load_data", "logits_of", "random_inputs", "torch_forward",
           "verification_inputs"]


# -------------------------------------------------------------------------------------------------- inputs

def load_data(path, input_shape: tuple[int, ...]) -> np.ndarray:
    """The `x` array of an .npz file, checked against the model's per-sample input shape."""
    from ..data.npz import read_npz

    x = np.asarray(read_npz(path, required=("x",))["x"])
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"Data file '{path}': 'x' must be a numeric array, got dtype {x.dtype}.")
    x = x.astype(np.float32)
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"Data file '{path}' holds samples of shape {list(x.shape[1:])}, but the model takes "
                        f"{list(input_shape)}.")
    if len(x) == 0:
        raise DataError(f"Data file '{path}' holds no samples.")
    return x


def random_inputs(model: nn.Module | None, input_shape: tuple[int, ...], samples: int, seed: int = 0) -> np.ndarray:
    """Seeded inputs the model accepts: uniform [0, 1) images/sequences, or {0, 1} frames for event input."""
    rng = np.random.default_rng(seed)
    spec = getattr(model, "bc_spec", None) or {}
    events = (spec.get("kwargs") or {}).get("input_mode") == "events"
    x = rng.random((samples,) + tuple(input_shape), dtype=np.float32)
    return (x < 0.5).astype(np.float32) if events else x


def verification_inputs(model: nn.Module | None, input_shape, batch: int, data=None, samples: int | None = None,
                        seed: int = 0) -> tuple[np.ndarray, str]:
    """(inputs, 'data'|'random'): `samples` of them (default: 4 or one graph batch if larger; up to 16 rows of
    data)."""
    if data is not None:
        x = load_data(data, input_shape)
        n = samples if samples else min(len(x), max(batch, 16))
        return x[:n], "data"
    return random_inputs(model, input_shape, samples or max(batch, DEFAULT_SAMPLES), seed), "random"


# ------------------------------------------------------------------------------------------------ PyTorch

def logits_of(out, model=None, batch: int | None = None):
    """The logits tensor in a model's output: a tensor; a tuple/list's first tensor (Nones dropped); a dict's
    'logits' or 'out' entry; per-time-step logits [T, B, K] averaged over T when `batch` is given (the rule
    `training.outputs.select_logits` applies everywhere)."""
    from ..errors import ModelError
    from ..training.outputs import select_logits

    try:
        return select_logits(out, False, model, batch)
    except ModelError as e:
        raise ExportError(str(e)) from None


class NeuronRecorder:
    """Forward hooks that record the outputs of the named modules, and for LIF neurons which spikes were rounding
    ties (|H − V_th| <= tie_eps·max(1, |V_th|) at that step); removed on exit.

    Keys are module paths; the k-th call (k >= 1) of a module called more than once is `path#k`, as in the
    exported graph's metadata.
    """

    def __init__(self, model: nn.Module, paths: list[str], tie_eps: float = TIE_EPS) -> None:
        self.model = model
        self.modules = sorted({p.split("#", 1)[0] for p in paths})
        self.tie_eps = tie_eps
        self.outputs: dict[str, torch.Tensor] = {}
        self.ties: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self._steps: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        self._patched: list[nn.Module] = []

    def _record(self, path: str, out) -> None:
        k = self.calls.get(path, 0)
        self.calls[path] = k + 1
        steps = self._steps.pop(path, [])
        if not isinstance(out, torch.Tensor):
            return
        key = path if k == 0 else f"{path}#{k}"
        self.outputs[key] = out.detach()
        if len(steps) == 1 and steps[0].shape == out.shape:  # one step per call ('s' mode): no time axis
            self.ties[key] = (steps[0], False)
        elif steps and torch.Size((len(steps),) + tuple(steps[0].shape)) == out.shape:
            self.ties[key] = (torch.stack(steps, 0), True)  # time-first [T, ...], one mask per step

    def _patch_fire(self, path: str, module: nn.Module) -> None:
        from ..nn.lif import LIF

        if not isinstance(module, LIF) or "fire" in module.__dict__:
            return
        fire = module.fire
        eps = self.tie_eps * max(1.0, abs(float(module.v_threshold)))

        def recording_fire(h, _fire=fire, _path=path, _vth=module.v_threshold):
            self._steps.setdefault(_path, []).append(((h - _vth).abs() <= eps).detach())
            return _fire(h)
        module.fire = recording_fire
        self._patched.append(module)

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for p in self.modules:
            m = modules.get(p)
            if m is None:
                raise ExportError(f"The graph records neuron '{p}', which the PyTorch model does not have; verify "
                                  "against the model the graph was exported from.")
            self._patch_fire(p, m)
            self.handles.append(m.register_forward_hook(lambda mod, args, out, p=p: self._record(p, out)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for m in self._patched:
            m.__dict__.pop("fire", None)
        return False


def _as_list(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _as_list(o)]
    if isinstance(out, dict):
        return [a for o in out.values() for a in _as_list(o)]
    raise ExportError(f"The model returned a {type(out).__name__}; only tensors (or tuples of them) can be compared.")


def torch_forward(model: nn.Module, x: np.ndarray, paths: list[str], tie_eps: float = TIE_EPS
                  ) -> tuple[list[np.ndarray], dict, dict]:
    """(logits, {neuron path: spikes}, {neuron path: tie mask}) of the PyTorch model on x."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad(), NeuronRecorder(model, paths, tie_eps) as rec:
        out = logits_of(model(torch.from_numpy(np.ascontiguousarray(x)).to(device)), model, len(x))
    return (_as_list(out), {p: t.cpu().numpy() for p, t in rec.outputs.items()},
            {p: (t.cpu().numpy(), time_first) for p, (t, time_first) in rec.ties.items()})


# x_batch, {neuron path: PyTorch's spikes to feed, or None} -> (outputs, {neuron path: the graph's spikes})
GraphFn = Callable[[np.ndarray, dict], tuple[list[np.ndarray], dict]]


# ----------------------------------------------------------------------------------------------- comparing

def compare(model: nn.Module, run_graph: GraphFn, x: np.ndarray, batch: int, paths: list[str], runtime: str,
            tolerance: float = DEFAULT_TOLERANCE, data: str = "random", check_binary: bool = True,
            stepwise: bool = False, tie_eps: float = TIE_EPS, progress=None) -> VerifyReport:
    """Run PyTorch and the graph batch by batch on x and compare outputs and neuron spikes.

    Args:
        model: the PyTorch model (eval mode).
        run_graph: (x_batch, feeds) -> (outputs, {neuron path: graph tensor}); with `stepwise`, `feeds` holds
            PyTorch's spikes of every neuron, for the runner to feed each neuron's consumers.
        x: all samples; the last batch is padded by repeating samples (padding is not compared).
        batch: the graph's fixed batch size.
        paths: neurons to compare, in execution order.
        stepwise: the runner feeds PyTorch's spikes, so differing spikes at rounding ties are told apart.
        tie_eps: how close to V_th (relative to max(1, |V_th|)) a membrane counts as a tie.
        progress: called with a line before each batch when the batches are many.
    """
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        return _compare(model, run_graph, x, batch, paths, runtime, tolerance, data, check_binary, stepwise,
                        tie_eps, progress, t0)
    finally:
        model.train(was_training)


def _spike_check(c: NeuronCheck, r: np.ndarray, g: np.ndarray, ties, check_binary: bool) -> None:
    """Count the differing spikes of one neuron call; `ties` is (mask, time_first) from the recorder or None."""
    differ = r != g
    if ties is not None and ties[0].shape == r.shape:
        mask, time_first = ties
        tie_flip = differ & mask
        # a hard reset carries a tie flip into the later steps of the same element
        explained = np.logical_or.accumulate(tie_flip, axis=0) if time_first else tie_flip
        c.ties += int(np.count_nonzero(differ & explained))
        differ = differ & ~explained
    c.flipped += int(np.count_nonzero(differ))
    c.total += int(r.size)
    if check_binary:
        c.non_binary += int(np.count_nonzero((g != 0) & (g != 1)))


def _compare(model, run_graph, x, batch, paths, runtime, tolerance, data, check_binary, stepwise, tie_eps,
             progress, t0) -> VerifyReport:
    checks = {p: NeuronCheck(p) for p in paths}
    report = VerifyReport(runtime=runtime, samples=len(x), tolerance=tolerance, stepwise=stepwise, tie_eps=tie_eps,
                          data=data)
    n = len(x)
    batches = range(0, n, batch)
    for b, start in enumerate(batches):
        if progress is not None and len(batches) > 1:
            progress(f"verifying batch {b + 1} of {len(batches)} ({runtime})")
        chunk = x[start:start + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, x[np.arange(batch - real) % n]], 0)
        ref_out, ref_spikes, ref_ties = torch_forward(model, chunk, paths, tie_eps)
        feeds = {p: ref_spikes.get(p) for p in paths} if stepwise else {}
        try:
            got_out, got_spikes = run_graph(chunk, feeds)
        except BestcompressError:
            raise
        except Exception as e:  # the runtime rejected the graph: a user-facing sentence, not a traceback
            raise ExportError(f"{runtime} could not run the graph ({type(e).__name__}: {short_reason(e)}).") \
                from None
        if len(got_out) != len(ref_out):
            raise ExportError(f"The graph has {len(got_out)} outputs but the PyTorch model returns {len(ref_out)}.")
        for r, g in zip(ref_out, got_out):
            if r.shape != g.shape:
                raise ExportError(f"The graph's output has shape {list(g.shape)} but PyTorch's has {list(r.shape)}.")
            r, g = r[:real].astype(np.float64), g[:real].astype(np.float64)
            bad_r, bad_g = int(np.count_nonzero(~np.isfinite(r))), int(np.count_nonzero(~np.isfinite(g)))
            if (bad_r or bad_g) and not report.non_finite:
                report.non_finite_side = "PyTorch's" if bad_r else "the graph's"
            report.non_finite += max(bad_r, bad_g)
            finite = np.isfinite(r) & np.isfinite(g)
            if finite.any():
                report.max_abs_diff = max(report.max_abs_diff, float(np.abs(r[finite] - g[finite]).max()))
        for p in paths:
            if p not in ref_spikes or p not in got_spikes:
                continue
            r, g = ref_spikes[p], got_spikes[p]
            if r.shape != g.shape:
                raise ExportError(f"The graph's spikes of neuron '{p}' have shape {list(g.shape)} but PyTorch's "
                                  f"have {list(r.shape)}; verify against the model the graph was exported from.")
            # the padding samples are real inputs too: their spikes are compared as well
            _spike_check(checks[p], r, g, ref_ties.get(p) if stepwise else None, check_binary)
    report.neurons = [checks[p] for p in paths]
    report.seconds = time.perf_counter() - t0
    return report
