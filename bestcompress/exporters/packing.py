"""Binary weights as sign bits and back, bit-exactly: the latent weights a packed (.bcz) layer is rebuilt from.

What is stored is exactly what the binary weights need. A binary layer computes W_b = sign(Ŵ) (or α_c·sign(Ŵ))
with Ŵ = (W − mean_c)/std_c, so a reloaded model does not need W, only a latent weight W' that standardizes to
the same signs (and the same α_c):
- sign: W' = ±1. Each channel's mean lies strictly between −1 and +1 unless all its signs agree, so
  sign(W' − mean_c) reproduces every sign; an all-+1 channel standardizes to 0, whose sign is +1 again.
- sign_scaled: W' = ±1 except the first positive entry, set to a value v_c > 1 found by bisection so that
  mean|standardize(W')| equals α_c to the last bit (more spread lowers the ratio mean|Ŵ|/std from its maximum,
  reached at two values, continuously), and the first negative entry, −(1 + k_c/64), a second knob for when
  float rounding steps over α_c. α_c itself is not stored: the model recomputes it.
Every channel is re-derived through the layer's own code at pack time; one that does not come out bit-exact
(e.g. an all-negative channel, or an α_c outside the reachable range) is stored in full precision instead.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..nn.binary import standardize_per_channel

def _binary_weight_of(layer: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """The binary weight `layer` computes when its latent weight is `latent`."""
    probe = copy.copy(layer)  # shallow: shares the quantizer modules, has its own parameter slot
    probe._parameters = dict(layer._parameters)
    probe._parameters["weight"] = nn.Parameter(latent, requires_grad=False)
    with torch.no_grad():
        return probe.binary_weight()


def rows_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per output channel: bit-identical (compares the float32 bit patterns)."""
    a32 = a.detach().to(torch.float32).contiguous().view(torch.int32).flatten(1)
    b32 = b.detach().to(torch.float32).contiguous().view(torch.int32).flatten(1)
    return (a32 == b32).all(1)


SECOND_STEPS = 8  # values tried for the second free entry: −(1 + k/64), k = 0..7


def _first_index(flat: torch.Tensor, positive: bool) -> torch.Tensor:
    return torch.argmax(((flat > 0) if positive else (flat < 0)).to(torch.int8), 1)


def _latent_rows(signs: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """±1 rows whose first positive entry is v and whose first negative entry is −(1 + k/64)."""
    flat = signs.flatten(1).clone()
    rows = torch.arange(flat.shape[0])
    pos, neg = (flat > 0).any(1), (flat < 0).any(1)
    p_idx, n_idx = _first_index(flat, True), _first_index(flat, False)
    flat[rows[neg], n_idx[neg]] = -(1.0 + k[neg].to(torch.float32) / 64.0)
    flat[rows[pos], p_idx[pos]] = v[pos]
    return flat.view_as(signs)


def _scaled_latent(layer: nn.Module, signs: torch.Tensor, target: torch.Tensor, steps: int = 32,
                   scan: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v, k, found) per channel such that _latent_rows(signs, v, k) reproduces α_c = `target` bit-exactly.

    α(v) = mean|standardize(W')| falls continuously as v grows (from its two-valued maximum at v = 1), so a
    bisection on the float32 bit patterns of v finds the crossing; rounding can step over the exact value, so
    the neighbours are scanned and, failing that, the second entry k gives the rounding another chance.
    """
    C = signs.shape[0]
    flat = signs.flatten(1)
    usable = (flat > 0).any(1) & (flat < 0).any(1)
    negatives = (flat < 0).sum(1).to(torch.float32)
    one_bits = int(torch.ones(1).view(torch.int32))

    def as_float(bits: torch.Tensor) -> torch.Tensor:
        return bits.to(torch.int32).view(torch.float32)

    def alpha(sub: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # the layer's own arithmetic (standardize, then Brevitas' per-channel AVE of |Ŵ|) on a subset of rows;
        # rows are independent, and the caller re-checks the winners through the layer itself
        return standardize_per_channel(_latent_rows(sub, v, k)).flatten(1).abs().mean(1)

    best_v = torch.ones(C)
    best_k = torch.zeros(C, dtype=torch.int64)
    found = torch.zeros(C, dtype=torch.bool)
    for k_step in range(SECOND_STEPS):
        idx = torch.nonzero(usable & ~found).flatten()
        if not len(idx):
            break
        sub, tgt = signs[idx], target[idx]
        k = torch.full((len(idx),), k_step, dtype=torch.int64)
        lo = torch.full((len(idx),), one_bits, dtype=torch.int64)
        hi = (1.0 + 2.0 * negatives[idx] * (1 - 1e-3)).clamp(min=1.0).view(torch.int32).to(torch.int64)
        for _ in range(steps):
            mid = (lo + hi) // 2
            above = alpha(sub, as_float(mid), k) > tgt
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        got = torch.zeros(len(idx), dtype=torch.bool)
        for d in range(-scan, scan + 1):
            cand = as_float((hi + d).clamp(min=one_bits))
            ok = (alpha(sub, cand, k) == tgt) & ~got
            best_v[idx[ok]] = cand[ok]
            best_k[idx[ok]] = k_step
            got |= ok
        found[idx[got]] = True
    return best_v, best_k, found


def pack_layer(name: str, layer: nn.Module, arrays: dict, info: dict) -> None:
    w = layer.weight.detach().to(torch.float32).cpu()
    bw = layer.binary_weight().detach().to(torch.float32).cpu()
    signs = torch.where(bw > 0, 1.0, -1.0)  # a zero scale (all-zero channel) packs as +1 and is checked below
    scaled = bool(getattr(layer, "binary_scaled", False))
    latent = signs.clone()
    exact = torch.ones(w.shape[0], dtype=torch.bool)
    if scaled:
        target = bw.flatten(1).abs().amax(1)
        v, k, exact = _scaled_latent(layer, signs, target)
        latent = _latent_rows(signs, v, k)
        arrays[f"latent/{name}"] = v.numpy().astype(np.float32)
        arrays[f"latentk/{name}"] = k.numpy().astype(np.uint8)
    exact &= rows_equal(_binary_weight_of(layer, latent), bw)
    raw_idx = torch.nonzero(~exact).flatten()
    if len(raw_idx):
        latent.flatten(1)[raw_idx] = w.flatten(1)[raw_idx]
        arrays[f"raw/{name}"] = w.flatten(1)[raw_idx].numpy()
        arrays[f"rawidx/{name}"] = raw_idx.numpy().astype(np.int64)
    if not bool(rows_equal(_binary_weight_of(layer, latent), bw).all()):
        raise ExportError(f"Packing '{name}' could not reproduce its binary weights bit-exactly.")
    arrays[f"bits/{name}"] = np.packbits((signs > 0).numpy().reshape(-1).astype(np.uint8))
    info[name] = {"shape": list(w.shape), "quantizer": "sign_scaled" if scaled else "sign",
                  "raw_channels": int(len(raw_idx))}


def unpack_layer(name: str, meta: dict, arrays) -> torch.Tensor:
    shape = tuple(meta["shape"])
    n = int(np.prod(shape))
    bits = np.unpackbits(arrays[f"bits/{name}"])[:n]
    latent = torch.from_numpy(np.where(bits > 0, 1.0, -1.0).astype(np.float32).reshape(shape))
    flat = latent.view(shape[0], -1)
    if meta["quantizer"] == "sign_scaled":
        latent = _latent_rows(latent, torch.from_numpy(arrays[f"latent/{name}"]),
                              torch.from_numpy(arrays[f"latentk/{name}"].astype(np.int64)))
        flat = latent.view(shape[0], -1)
    if f"rawidx/{name}" in arrays:
        idx = torch.from_numpy(arrays[f"rawidx/{name}"])
        flat[idx] = torch.from_numpy(arrays[f"raw/{name}"])
    return latent
