"""What a verification found: per-neuron spike checks and the verdict, said in one sentence."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_TOLERANCE = 1e-4
DEFAULT_SAMPLES = 4
# A spike whose PyTorch membrane lies this close to the threshold (|H − V_th| <= TIE_EPS·max(1, |V_th|)) may fire
# in one runtime and not in the other through float rounding alone (a different summation order in a conv, a
# fused BatchNorm): a "tie". Rounding moves a membrane by ~1e-6 here; a wrong weight or op moves it by ~1e-2 or more.
TIE_EPS = 1e-4


@dataclass
class NeuronCheck:
    """One neuron (one call of it): how many of its spikes differ, and of those how many are rounding ties."""

    path: str
    flipped: int = 0  # spikes that differ and are not explained by a tie
    ties: int = 0  # spikes that differ where PyTorch's membrane was within TIE_EPS of V_th (or after such a tie)
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
    non_finite: int = 0  # NaN/Inf values in the outputs (of the graph or of PyTorch)
    non_finite_side: str = ""  # 'PyTorch's' or "the graph's": who produced them first
    stepwise: bool = False  # every neuron was fed PyTorch's own input spikes (a tie cannot cascade)
    tie_eps: float = TIE_EPS
    # onnxruntime: the graph matched with its optimizations off; with them on, this fraction of spikes differed
    optimized_flips: float | None = None
    optimized_note: str = ""  # why rounding is amplified there (BatchNorms of zero running variance), or ''

    @property
    def flipped_fraction(self) -> float:
        total = sum(n.total for n in self.neurons)
        return sum(n.flipped for n in self.neurons) / total if total else 0.0

    @property
    def ties(self) -> int:
        return sum(n.ties for n in self.neurons)

    @property
    def non_binary(self) -> int:
        return sum(n.non_binary for n in self.neurons)

    @property
    def passed(self) -> bool:
        return (self.non_finite == 0 and bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance
                and self.non_binary == 0 and self.weights_exact is not False
                and not any(n.flipped for n in self.neurons))

    @property
    def only_spikes_differ(self) -> bool:
        """Failed on spike flips alone: outputs within tolerance and finite, every value binary, weights exact."""
        return (not self.passed and self.non_finite == 0 and bool(np.isfinite(self.max_abs_diff))
                and self.max_abs_diff <= self.tolerance and self.non_binary == 0 and self.weights_exact is not False)

    def _optimized_text(self) -> str:
        if self.optimized_flips is None:
            return ""
        why = f": {self.optimized_note}" if self.optimized_note else ""
        return (f"; with onnxruntime's graph optimizations on, {100 * self.optimized_flips:.3g} % of spikes differ, "
                f"rounding of its fused ops{why}")

    def first_divergence(self) -> str:
        if self.weights_exact is False:
            return f"the binary weights of '{self.weight_mismatch}' are not bit-exact"
        if self.non_finite:
            return f"{self.non_finite_side} outputs hold {self.non_finite} NaN or infinite values"
        for n in self.neurons:
            if n.flipped or n.non_binary:
                what = f"{100 * n.flip_fraction:.3g} % of its spikes differ"
                if n.non_binary:
                    what += f", {n.non_binary} values are not 0 or 1"
                where = " with PyTorch's own input spikes" if self.stepwise else ""
                return f"first diverges at neuron '{n.path}'{where} ({what})"
        if self.neurons:
            return (f"no spike differs at any of the {len(self.neurons)} neurons, so the difference is in the "
                    "full-precision path (residual stream, normalization or head)")
        return "no neuron could be matched to a graph tensor"

    def _ties_text(self) -> str:
        if not self.ties:
            return ""
        return (f" ({self.ties} rounding ties, where PyTorch's membrane was within {self.tie_eps:g} of the "
                "threshold, not counted)")

    def message(self, what: str = "The export") -> str:
        if self.passed:
            if self.neurons:
                how = ", each neuron fed PyTorch's input spikes" if self.stepwise else ""
                spikes = (f"{100 * self.flipped_fraction:.3g} % spikes differ over {len(self.neurons)} neurons{how}"
                          f"{self._ties_text()}")
            else:
                spikes = "outputs only (no neuron maps to a tensor of this graph)"
            return (f"{what} matches PyTorch on {self.samples} {self.data} samples ({self.runtime}): max abs diff "
                    f"{self.max_abs_diff:.3g}, {spikes}{self._optimized_text()}.")
        return (f"{what} does not compute what PyTorch computes ({self.runtime}, {self.samples} {self.data} samples): "
                f"max abs diff of the outputs {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}); "
                f"{self.first_divergence()}.")

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "samples": self.samples, "data": self.data, "tolerance": self.tolerance,
                "max_abs_diff": float(self.max_abs_diff), "passed": self.passed, "stepwise": self.stepwise,
                "flipped_fraction": self.flipped_fraction, "ties": self.ties, "tie_eps": self.tie_eps,
                "non_binary": self.non_binary, "non_finite": self.non_finite,
                "weights_exact": self.weights_exact, "seconds": round(self.seconds, 3),
                "optimized_flipped_fraction": self.optimized_flips, "optimized_note": self.optimized_note,
                "neurons": [{"path": n.path, "flip_fraction": n.flip_fraction, "ties": n.ties,
                             "non_binary": n.non_binary} for n in self.neurons]}
