"""Numerical verification of an export against PyTorch: logits and the spikes of every neuron.

The exported graph (qonnx node-by-node execution for QONNX, onnxruntime for standard ONNX, FINN's Python
executor for FINN, the reloaded PyTorch model for a packed artifact) and the PyTorch model run on the same
batch — real data from an .npz file (`x`) when given, else seeded random inputs. Reported: the largest absolute
difference of the outputs, and for every neuron the fraction of its spikes that differ (PyTorch forward hooks vs
the graph tensor recorded at export) and how many graph values are not 0 or 1. The check fails when the output
difference exceeds the tolerance or a spike tensor holds a value other than 0 and 1; the message names the first
neuron (in execution order) where the two diverge.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import BestcompressError, DataError, ExportError

DEFAULT_TOLERANCE = 1e-4
DEFAULT_SAMPLES = 4


@dataclass
class NeuronCheck:
    path: str
    flipped: int = 0
    total: int = 0
    non_binary: int = 0

    @property
    def flip_fraction(self) -> float:
        return self.flipped / self.total if self.total else 0.0


@dataclass
class VerifyReport:
    """What verification found. `passed` is the verdict; `message()` says it in one sentence."""

    runtime: str
    samples: int
    tolerance: float
    max_abs_diff: float = 0.0
    neurons: list[NeuronCheck] = field(default_factory=list)
    seconds: float = 0.0
    weights_exact: bool | None = None  # packed artifacts: binary weights bit-exact
    weight_mismatch: str | None = None
    data: str = "random"

    @property
    def flipped_fraction(self) -> float:
        total = sum(n.total for n in self.neurons)
        return sum(n.flipped for n in self.neurons) / total if total else 0.0

    @property
    def non_binary(self) -> int:
        return sum(n.non_binary for n in self.neurons)

    @property
    def passed(self) -> bool:
        return (bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance
                and self.non_binary == 0 and self.weights_exact is not False)

    def first_divergence(self) -> str:
        if self.weights_exact is False:
            return f"the binary weights of '{self.weight_mismatch}' are not bit-exact"
        for n in self.neurons:
            if n.flipped or n.non_binary:
                what = f"{100 * n.flip_fraction:.3g} % of its spikes differ"
                if n.non_binary:
                    what += f", {n.non_binary} values are not 0 or 1"
                return f"first diverges at neuron '{n.path}' ({what})"
        if self.neurons:
            return (f"no spike differs at any of the {len(self.neurons)} neurons, so the difference is in the "
                    "full-precision path (residual stream, normalization or head)")
        return "no neuron could be matched to a graph tensor"

    def message(self, what: str = "The export") -> str:
        if self.passed:
            spikes = (f"{100 * self.flipped_fraction:.3g} % spikes differ over {len(self.neurons)} neurons"
                      if self.neurons else "outputs only (no neuron maps to a tensor of this graph)")
            return (f"{what} matches PyTorch on {self.samples} {self.data} samples ({self.runtime}): max abs diff "
                    f"{self.max_abs_diff:.3g}, {spikes}.")
        return (f"{what} does not compute what PyTorch computes ({self.runtime}, {self.samples} {self.data} samples): "
                f"max abs diff of the outputs {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}); "
                f"{self.first_divergence()}.")

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "samples": self.samples, "data": self.data, "tolerance": self.tolerance,
                "max_abs_diff": float(self.max_abs_diff), "passed": self.passed,
                "flipped_fraction": self.flipped_fraction, "non_binary": self.non_binary,
                "weights_exact": self.weights_exact, "seconds": round(self.seconds, 3),
                "neurons": [{"path": n.path, "flip_fraction": n.flip_fraction, "non_binary": n.non_binary}
                            for n in self.neurons]}


# -------------------------------------------------------------------------------------------------- inputs

def load_data(path: str | Path, input_shape: tuple[int, ...]) -> np.ndarray:
    """The `x` array of an .npz file, checked against the model's per-sample input shape."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file '{path}' does not exist.")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise DataError(f"Data file '{path}' has no array 'x' (it has {', '.join(f.files) or 'none'}).")
            x = np.asarray(f["x"], dtype=np.float32)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"Data file '{path}' is not a readable .npz archive ({type(e).__name__}).") from None
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


# ----------------------------------------------------------------------------------------------- comparing

class NeuronRecorder:
    """Forward hooks that record the outputs of the named modules (removed on exit).

    Keys are module paths; the k-th call (k >= 1) of a module called more than once is `path#k`, as in the
    exported graph's metadata.
    """

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        self.model = model
        self.modules = sorted({p.split("#", 1)[0] for p in paths})
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles = []

    def _record(self, path: str, out) -> None:
        k = self.calls.get(path, 0)
        self.calls[path] = k + 1
        if isinstance(out, torch.Tensor):
            self.outputs[path if k == 0 else f"{path}#{k}"] = out.detach()

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for p in self.modules:
            m = modules.get(p)
            if m is None:
                raise ExportError(f"The graph records neuron '{p}', which the PyTorch model does not have; verify "
                                  "against the model the graph was exported from.")
            self.handles.append(m.register_forward_hook(lambda mod, args, out, p=p: self._record(p, out)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def _as_list(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _as_list(o)]
    if isinstance(out, dict):
        return [a for o in out.values() for a in _as_list(o)]
    raise ExportError(f"The model returned a {type(out).__name__}; only tensors (or tuples of them) can be compared.")


def torch_forward(model: nn.Module, x: np.ndarray, paths: list[str]) -> tuple[list[np.ndarray], dict]:
    """(outputs, {neuron path: spikes}) of the PyTorch model on x."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad(), NeuronRecorder(model, paths) as rec:
        out = model(torch.from_numpy(np.ascontiguousarray(x)).to(device))
    return _as_list(out), {p: t.cpu().numpy() for p, t in rec.outputs.items()}


GraphFn = Callable[[np.ndarray], tuple[list[np.ndarray], dict]]


def compare(model: nn.Module, run_graph: GraphFn, x: np.ndarray, batch: int, paths: list[str], runtime: str,
            tolerance: float = DEFAULT_TOLERANCE, data: str = "random", check_binary: bool = True) -> VerifyReport:
    """Run PyTorch and the graph batch by batch on x and compare outputs and neuron spikes.

    Args:
        model: the PyTorch model (eval mode).
        run_graph: x_batch -> (outputs, {neuron path: graph tensor}).
        x: all samples; the last batch is padded by repeating samples (padding is not compared).
        batch: the graph's fixed batch size.
        paths: neurons to compare, in execution order.
    """
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        return _compare(model, run_graph, x, batch, paths, runtime, tolerance, data, check_binary, t0)
    finally:
        model.train(was_training)


def _compare(model, run_graph, x, batch, paths, runtime, tolerance, data, check_binary, t0) -> VerifyReport:
    checks = {p: NeuronCheck(p) for p in paths}
    max_diff = 0.0
    n = len(x)
    for start in range(0, n, batch):
        chunk = x[start:start + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, x[np.arange(batch - real) % n]], 0)
        ref_out, ref_spikes = torch_forward(model, chunk, paths)
        try:
            got_out, got_spikes = run_graph(chunk)
        except BestcompressError:
            raise
        except Exception as e:  # the runtime rejected the graph: a user-facing sentence, not a traceback
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise ExportError(f"{runtime} could not run the graph ({type(e).__name__}: {msg}).") from None
        if len(got_out) != len(ref_out):
            raise ExportError(f"The graph has {len(got_out)} outputs but the PyTorch model returns {len(ref_out)}.")
        for r, g in zip(ref_out, got_out):
            if r.shape != g.shape:
                raise ExportError(f"The graph's output has shape {list(g.shape)} but PyTorch's has {list(r.shape)}.")
            diff = np.abs(r[:real].astype(np.float64) - g[:real].astype(np.float64))
            max_diff = max(max_diff, float(np.nanmax(diff)) if diff.size else 0.0)
            if not np.isfinite(g[:real]).all() and np.isfinite(r[:real]).all():
                max_diff = float("inf")
        for p in paths:
            if p not in ref_spikes or p not in got_spikes:
                continue
            r, g = ref_spikes[p], got_spikes[p]
            c = checks[p]
            if r.shape != g.shape:
                c.flipped += r.size
                c.total += r.size
                continue
            c.flipped += int(np.count_nonzero(r != g))
            c.total += int(r.size)
            if check_binary:
                c.non_binary += int(np.count_nonzero((g != 0) & (g != 1)))
    return VerifyReport(runtime=runtime, samples=n, tolerance=tolerance, max_abs_diff=max_diff,
                        neurons=[checks[p] for p in paths], seconds=time.perf_counter() - t0, data=data)


# ------------------------------------------------------------------------------------------ graph runners

def graph_batch(proto) -> int:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else 1


def graph_input_shape(proto) -> tuple[int, ...]:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return tuple(int(d.dim_value) for d in dims[1:])


def is_qonnx(proto) -> bool:
    from . import graph as G
    return any(n.domain not in G.STANDARD_DOMAINS for n in proto.graph.node)


def qonnx_runner(proto, spikes: dict[str, str]) -> GraphFn:
    """Node-by-node execution with qonnx's executor, returning the spike tensors too."""
    from .graph import GraphRunner

    runner = GraphRunner(proto)
    name = runner.input_names[0]
    keep = set(spikes.values())

    def run(x):
        ctx = runner.run({name: x}, keep=keep)
        return [ctx[o] for o in runner.output_names], {p: ctx[t] for p, t in spikes.items() if t in ctx}
    return run


def ort_runner(proto, spikes: dict[str, str]) -> GraphFn:
    """onnxruntime with the spike tensors added as graph outputs."""
    import onnxruntime as ort

    from .onnx import with_outputs

    n_out = len(proto.graph.output)
    outputs = [o.name for o in proto.graph.output]
    taps = [(p, t) for p, t in spikes.items() if t not in outputs]
    extended = with_outputs(proto, [t for _, t in taps])
    try:
        sess = ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load the graph ({str(e).strip().splitlines()[0][:200]}).") from None
    name = proto.graph.input[0].name

    def run(x):
        res = sess.run(None, {name: x})
        tapped = {p: r for (p, _), r in zip(taps, res[n_out:])}
        tapped.update({p: res[outputs.index(t)] for p, t in spikes.items() if t in outputs})
        return res[:n_out], tapped
    return run


def verify_graph(proto, model: nn.Module, runtime: str | None = None, data=None, samples: int | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> VerifyReport:
    """Verify an exported ONNX/QONNX graph against the PyTorch model it came from.

    Args:
        proto: the ONNX ModelProto (as exported: its metadata maps neurons to graph tensors).
        model: the PyTorch binary model.
        runtime: 'qonnx' or 'onnxruntime'; chosen from the graph's ops when None.
        data: an .npz file with `x` (real inputs); seeded random inputs when None.
        samples: how many inputs to compare (default: 4 or one graph batch; up to 16 rows of data).
        tolerance: largest allowed absolute difference of the outputs.
    Returns:
        The VerifyReport (check `.passed`).
    """
    from .qonnx import get_meta

    meta = get_meta(proto)
    spikes = dict(meta.get("spikes") or {})
    runtime = runtime or ("qonnx" if is_qonnx(proto) else "onnxruntime")
    batch = graph_batch(proto)
    shape = graph_input_shape(proto)
    own = getattr(model, "bc_input_shape", None)
    if own is not None and tuple(own) != shape:
        raise ExportError(f"The graph takes inputs of shape {list(shape)} but the PyTorch model takes {list(own)}; "
                          "verify against the model the graph was exported from.")
    x, kind = verification_inputs(model, shape, batch, data, samples, seed)
    run = qonnx_runner(proto, spikes) if runtime == "qonnx" else ort_runner(proto, spikes)
    return compare(model, run, x, batch, list(spikes), runtime, tolerance, kind)


def verify_file(path: str | Path, model: nn.Module, data=None, samples: int | None = None,
                tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> VerifyReport:
    """Re-check an exported file (.onnx QONNX or standard, .bcz packed, or a FINN export folder) against the
    binary PyTorch model it was exported from."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"'{path}' does not exist.")
    if path.is_dir():
        from .finn import verify_finn_dir
        return verify_finn_dir(path, model, data=data, samples=samples, tolerance=tolerance, seed=seed)
    from .packed import is_packed, verify_packed
    if is_packed(path):
        return verify_packed(path, model, data=data, samples=samples, tolerance=tolerance, seed=seed)
    import onnx
    try:
        proto = onnx.load(str(path))
    except Exception:
        raise ExportError(f"'{path}' is neither an ONNX graph, a packed .bcz artifact nor a FINN export folder.") \
            from None
    if not proto.graph.node:
        raise ExportError(f"'{path}' is neither an ONNX graph, a packed .bcz artifact nor a FINN export folder.")
    return verify_graph(proto, model, data=data, samples=samples, tolerance=tolerance, seed=seed)
