"""Calibration on a data set's training samples: what `binarize --calibrate DATA` and the start of `distill` run.

BatchNorm statistics are re-estimated, then the binary attention maps' scales λ are set from the real maps'
mass, then (recipe `reversible.stream_bits`) the coupled streams' power-of-two grids from their largest |value|
(nn/stream_quant.py), then the BatchNorm statistics again (the maps' new scale changes what the later layers see); the mechanisms
are bestcompress.nn.calibrate's recalibrate_batchnorm and calibrate_attention_scales. The same batches serve
every pass.

Given the full-precision model (`teacher`), the binary model's full-precision heads are then fitted to its heads by
least squares on the same batches (bestcompress.nn.head_fit; recipe `train.fit_heads`): on the MNIST-1D teachers of
benchmarks/ablation_cie.py this took the 0-epoch binary model from 68 % to 80 % (easy task) and from 27 % to 38 %
(hard task), measured on training sequences the students never see (ridge 0.01 picked there, of 0.01/0.05/0.2).

`refresh_batchnorm` re-estimates the BatchNorm statistics alone; distill runs it at the end of every epoch, before
the model is scored and saved, when calibration is on. A binary network's pre-activations jump whenever latent
weights cross zero, and the running averages (momentum 0.1) trail those jumps: at the last epoch of a 12-epoch
MNIST-1D run, statistics re-estimated on 8 training batches scored +0.5 to +0.7 points over the running ones.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..nn.calibrate import batchnorms, calibrate_attention_scales, recalibrate_batchnorm
from ..nn.head_fit import fit_heads
from ..nn.stream_quant import calibrate_stream_scales
from .evaluation import neuron_reset_fn, resolve_data


def calibration_batches(data, batches: int, batch_size: int, seed: int = 0, device=None):
    """The first `batches` batches of a seeded permutation of the training set, encoded (a generator)."""
    x_all = data.train.tensors[0]
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed * 100_003 + 17))
    gen = torch.Generator().manual_seed(seed * 100_003 + 19)
    for b in range(batches):
        sel = perm[b * batch_size:(b + 1) * batch_size]
        if len(sel) == 0:
            return
        x = data.encode(x_all[sel], gen)
        yield x.to(device) if device is not None else x


class Calibrated(NamedTuple):
    samples: int            # training samples seen per pass
    batchnorms: int         # BatchNorm layers whose statistics were re-estimated
    attention_scales: int   # binary attention maps whose λ was set
    heads: int = 0          # full-precision heads fitted to the full-precision model's
    streams: int = 0        # coupled streams whose power-of-two grid was set (reversible.stream_bits)

    def note(self, what: str = "training samples") -> str:
        """'BatchNorm statistics of N layers[, the scales of M binary attention maps][ and K heads fitted to the
        full-precision model's] on S <what>'."""
        parts = [f"BatchNorm statistics of {self.batchnorms} layers"]
        if self.attention_scales:
            parts.append(f"the scales of {self.attention_scales} binary attention maps")
        if self.streams:
            parts.append(f"the power-of-two grids of {self.streams} coupled streams")
        if self.heads:
            parts.append(f"{self.heads} head{'s' if self.heads > 1 else ''} fitted to the full-precision model's")
        return f"{', '.join(parts[:-1])}{' and ' if len(parts) > 1 else ''}{parts[-1]} on {self.samples} {what}"


def calibrate(model: nn.Module, data, *, batches: int = 8, batch_size: int = 64, seed: int = 0, device=None,
              encoding: str = "direct", subset: int | None = None, teacher: nn.Module | None = None,
              ridge: float = 0.01) -> Calibrated:
    """Re-estimate the BatchNorm statistics and the attention-map scales of `model` on `batches` training
    batches of `data` (module docstring).

    Args:
        model: the model (in place; left in eval mode, on its device). Weights do not change.
        data: a DataBundle or a data set name/path (fitted to the model).
        batches, batch_size: how much data to use.
        seed: which samples (a seeded permutation of the training set).
        device: where to run (default: where the model is).
        encoding, subset: as for load_dataset, when `data` is a name.
        teacher: the full-precision model; when given, the heads are fitted to its heads last (module docstring).
        ridge: the head fit's ridge coefficient (relative to the mean feature energy).
    Returns:
        Calibrated(samples seen, BatchNorm layers recalibrated, attention scales set, heads fitted); all 0 when
        the training set gave no batch.
    """
    data = resolve_data(data, model, encoding, subset, seed)
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    same = dict(batches=batches, batch_size=batch_size, seed=seed, device=device)
    seen = refresh_batchnorm(model, data, **same)
    if not seen:
        return Calibrated(0, 0, 0)
    scales = calibrate_attention_scales(model, calibration_batches(data, **same), reset=neuron_reset_fn(model))
    streams = calibrate_stream_scales(model, calibration_batches(data, **same), reset=neuron_reset_fn(model))
    if scales or streams:
        refresh_batchnorm(model, data, **same)
    heads = 0
    if teacher is not None:
        heads = fit_heads(model, teacher, calibration_batches(data, **same), ridge=ridge,
                          reset=neuron_reset_fn(model), teacher_reset=neuron_reset_fn(teacher))
    return Calibrated(seen, len(batchnorms(model)), scales, heads, streams)


def refresh_batchnorm(model: nn.Module, data, *, batches: int, batch_size: int, seed: int = 0, device=None) -> int:
    """Re-estimate the BatchNorm statistics of `model` on `batches` training batches of `data` (a DataBundle);
    weights and attention scales stay. Returns the samples seen."""
    return recalibrate_batchnorm(model, calibration_batches(data, batches, batch_size, seed, device),
                                 reset=neuron_reset_fn(model))
