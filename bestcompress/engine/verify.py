"""Is the engine spike-exact with the PyTorch binary model? Every spike of every neuron, and the logits."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from ..nn.lif import LIF

DEFAULT_TOLERANCE = 1e-4


@dataclass
class EngineReport:
    """What verify found; `passed` is the verdict and `message()` says it in one sentence."""

    samples: int
    tolerance: float
    max_abs_diff: float = 0.0
    neurons: int = 0
    spikes: int = 0
    flipped: int = 0
    first_flip: str | None = None
    flips: dict[str, int] = field(default_factory=dict)
    packed_calls: int = 0
    float_calls: int = 0
    backend: str = ""

    @property
    def passed(self) -> bool:
        return self.flipped == 0 and bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance

    def message(self, what: str = "The engine") -> str:
        if self.passed:
            return (f"{what} is spike-exact with PyTorch on {self.samples} inputs: all {self.spikes} spikes of "
                    f"{self.neurons} neurons equal, logits within {self.max_abs_diff:.2g} (tolerance "
                    f"{self.tolerance:g}); {self.packed_calls} popcount calls, {self.float_calls} float calls.")
        where = (f"first differs at neuron '{self.first_flip}' ({self.flips[self.first_flip]} spikes)"
                 if self.first_flip else "no spike differs, the logits do")
        return (f"{what} differs from PyTorch: {self.flipped} of {self.spikes} spikes flipped, logits differ by "
                f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:g}); {where}.")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "samples": self.samples, "max_abs_diff": self.max_abs_diff,
                "neurons": self.neurons, "spikes": self.spikes, "flipped": self.flipped, "first_flip": self.first_flip,
                "packed_calls": self.packed_calls, "float_calls": self.float_calls, "backend": self.backend}


class _Spikes:
    """Forward hooks recording every call's output of every LIF neuron (key: path, path#1, ...)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.out, self.handles = model, {}, []

    def __enter__(self):
        for name, m in self.model.named_modules():
            if isinstance(m, LIF):
                self.handles.append(m.register_forward_hook(lambda mod, a, o, n=name: self._keep(n, o)))
        return self

    def _keep(self, name, out):
        k, key = 0, name
        while key in self.out:
            k += 1
            key = f"{name}#{k}"
        self.out[key] = out.detach().clone()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def _inputs(engine, data, samples: int, seed: int) -> np.ndarray:
    if data is None:
        if engine.input_shape is None:
            raise DataError("The model does not record its input shape; pass data to verify the engine on.")
        g = torch.Generator().manual_seed(seed)
        return torch.rand((samples,) + engine.input_shape, generator=g).numpy()
    if isinstance(data, (str, os.PathLike)):
        from ..exporters.verify import load_data
        return np.asarray(load_data(data, engine.input_shape), dtype=np.float32)[:samples]
    return np.asarray(data, dtype=np.float32)[:samples]


def verify(engine, model: nn.Module | None = None, data=None, samples: int = 4, batch: int = 2,
           tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> EngineReport:
    """Run the engine and the PyTorch binary model on the same inputs and compare all spikes and the logits.

    Args:
        engine: an Engine, or the path of a .bcz (then the reference is the PyTorch model rebuilt from it).
        model: the PyTorch binary model to compare with (default: rebuilt from the engine's .bcz).
        data: inputs (array [N, *input_shape] or an .npz/.npy path); default: seeded uniform random inputs.
        samples, batch: how many inputs, in batches of `batch`.
        tolerance: largest allowed absolute logit difference.
    Returns:
        An EngineReport.
    """
    from . import kernels
    from .runtime import Engine, _logits, load

    if not isinstance(engine, Engine):
        engine = load(engine)
    if model is None:
        if not engine.source:
            raise DataError("Pass the PyTorch model to verify an engine that was not loaded from a .bcz file.")
        from ..exporters.packed import load_packed
        model = load_packed(engine.source)
    model.eval()
    x = _inputs(engine, data, samples, seed)
    report = EngineReport(samples=len(x), tolerance=tolerance, backend=kernels.backend_description())
    engine.reset_stats()
    for start in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch]))
        with torch.no_grad(), _Spikes(model) as ref, _Spikes(engine.model) as got:
            r = _logits(model(xb), model, len(xb))
            g = engine(xb)
        diff = (r.double() - g.double()).abs()
        report.max_abs_diff = max(report.max_abs_diff, float(diff.max()) if diff.numel() else 0.0)
        report.neurons = len(ref.out)
        for key, rs in ref.out.items():
            gs = got.out.get(key)
            n = int((rs != gs).sum()) if gs is not None and gs.shape == rs.shape else int(rs.numel())
            report.spikes += int(rs.numel())
            if n:
                report.flipped += n
                report.flips[key] = report.flips.get(key, 0) + n
                if report.first_flip is None:
                    report.first_flip = key
    st = engine.stats()
    report.packed_calls = sum(v["packed"] for v in st["layers"].values()) + st["matmul"]["packed"]
    report.float_calls = sum(v["float"] for v in st["layers"].values()) + st["matmul"]["float"]
    return report


def check_packed_file(path, model: nn.Module, data=None, samples: int | None = None,
                      tolerance: float = DEFAULT_TOLERANCE) -> str | None:
    """For `bestcompress verify FILE`: when FILE is a .bcz, check the engine on it against `model` too.

    Returns:
        None when the file is not a .bcz, else the one-sentence verdict.
    Raises:
        ExportError: the engine is not spike-exact with the model.
    """
    from ..errors import ExportError
    from ..exporters.packed import is_packed
    from .runtime import load

    if not is_packed(path):
        return None
    report = verify(load(path), model, data=data, samples=samples or 4, tolerance=tolerance)
    what = f"The 1-bit engine on '{path}'"
    if not report.passed:
        raise ExportError(report.message(what))
    return report.message(what)
