"""The packed artifact (.bcz): one bit per binary weight, everything else in full precision.

A .bcz file is a NumPy .npz archive (a zip; read with `allow_pickle=False`, so loading runs no code) with a
`header` (uint8 JSON: format, version, source model spec, recipe, input shape, per-layer info and an index) and
one flat array per dtype (`blob_uint8`, `blob_float32`, ...), so that per-entry zip overhead does not eat the
gain; members are deflated (the sign bits are incompressible, the header and constant tensors such as never-used
LayerNorm parameters are not). The index maps these logical entries to (blob, offset, shape):

    bits/<param>      uint8, the sign bits of the binary weight, 8 per byte (np.packbits, row-major)
    latent/<param>    float32 [C_out], latentk/<param> uint8 [C_out] (sign_scaled layers only): what rebuilds α_c
    raw/<param>       float32 [k, K], rawidx/<param> int64 [k]: channels stored in full (see below)
    fp/<key>          every other state_dict entry, unchanged

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
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BestcompressError, CheckpointError, ExportError, short_reason
from ..nn.binary import is_binary_layer, standardize_per_channel
from .formats import ExportFormat, ExportOptions, ExportResult, path_bytes, register_format, write_verified
from .verify import compare, torch_forward, verification_inputs

FORMAT = "bestcompress-packed"
VERSION = 1
MAGIC = b"PK\x03\x04"


# ------------------------------------------------------------------------------------------ latent weights

def _binary_weight_of(layer: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """The binary weight `layer` computes when its latent weight is `latent`."""
    probe = copy.copy(layer)  # shallow: shares the quantizer modules, has its own parameter slot
    probe._parameters = dict(layer._parameters)
    probe._parameters["weight"] = nn.Parameter(latent, requires_grad=False)
    with torch.no_grad():
        return probe.binary_weight()


def _rows_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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


def _pack_layer(name: str, layer: nn.Module, arrays: dict, info: dict) -> None:
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
    exact &= _rows_equal(_binary_weight_of(layer, latent), bw)
    raw_idx = torch.nonzero(~exact).flatten()
    if len(raw_idx):
        latent.flatten(1)[raw_idx] = w.flatten(1)[raw_idx]
        arrays[f"raw/{name}"] = w.flatten(1)[raw_idx].numpy()
        arrays[f"rawidx/{name}"] = raw_idx.numpy().astype(np.int64)
    if not bool(_rows_equal(_binary_weight_of(layer, latent), bw).all()):
        raise ExportError(f"Packing '{name}' could not reproduce its binary weights bit-exactly.")
    arrays[f"bits/{name}"] = np.packbits((signs > 0).numpy().reshape(-1).astype(np.uint8))
    info[name] = {"shape": list(w.shape), "quantizer": "sign_scaled" if scaled else "sign",
                  "raw_channels": int(len(raw_idx))}


def _unpack_layer(name: str, meta: dict, arrays) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------------ the file

# What a damaged archive raises while it is read (zip structure, deflate stream, CRC, .npy header, JSON).
_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, struct.error, TypeError,
           IndexError, UnicodeDecodeError)


def _first_member(path: Path) -> str | None:
    """The name of the first member of a zip file, read from its first local header (works on a truncated file)."""
    with open(path, "rb") as f:
        head = f.read(30 + 64)
    if len(head) < 30 or head[:4] != MAGIC:
        return None
    n = struct.unpack("<H", head[26:28])[0]
    return head[30:30 + n].decode("latin-1") if 30 + n <= len(head) else None


def is_packed(path: str | Path) -> bool:
    """True when `path` is (or, damaged, claims to be) a .bcz archive written by save_packed: a zip whose first
    member is one of our arrays. A torch checkpoint is a zip too, but its members are `<name>/data.pkl`, ...;
    reading a damaged .bcz then says it is damaged instead of calling it "not a checkpoint"."""
    path = Path(path)
    if not path.is_file():
        return False
    name = _first_member(path)
    return name is not None and (name == "header.npy" or (name.startswith("blob_") and name.endswith(".npy")))


def _damaged(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"Packed artifact '{path}' is truncated or corrupted ({type(e).__name__}: "
                           f"{short_reason(e, 100)}); export it again.")


def save_packed(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write `model` (a binary model from `binarize`) as a packed .bcz artifact, atomically (not verified; the
    `packed` export format verifies before writing).

    Args:
        model: the binary model; it must carry bc_spec (how the source was built) and bc_recipe.
        path: output file.
        extra: JSON-able metadata to keep in the header.
    Returns:
        The path written.
    """
    from ..fileio import atomic_write

    return atomic_write(path, lambda tmp: write_packed(model, tmp, extra))


def write_packed(model: nn.Module, path: str | Path, extra: dict | None = None) -> None:
    """Write the .bcz archive to `path` directly (use save_packed for an atomic write)."""
    spec = getattr(model, "bc_spec", None)
    recipe = getattr(model, "bc_recipe", None)
    if not spec or recipe is None:
        raise ExportError("The model does not record how it was built (bc_spec and bc_recipe); pack a model "
                          "loaded from a bestcompress binary checkpoint or returned by binarize().")
    if "pickle" in spec:
        raise ExportError("A model rebuilt from a pickled module cannot be packed: the .bcz format stores "
                          "weights, not code; export it to ONNX instead.")
    arrays: dict[str, np.ndarray] = {}
    layers: dict[str, dict] = {}
    binary = {n: m for n, m in model.named_modules() if is_binary_layer(m)}
    for name, layer in binary.items():
        _pack_layer(name, layer, arrays, layers)
    skip = {f"{n}.weight" for n in binary}
    for key, value in model.state_dict().items():
        if key not in skip:
            arrays[f"fp/{key}"] = value.detach().cpu().numpy()
    from ..model_facts import model_input_shape
    shape = getattr(model, "bc_input_shape", None) or model_input_shape(model)
    header = {"format": FORMAT, "version": VERSION, "spec": spec, "recipe": recipe,
              "input_shape": list(shape) if shape is not None else None, "binary": layers,
              "state_keys": list(model.state_dict().keys()), "extra": dict(extra or {})}
    blobs, header["index"] = _consolidate(arrays)
    blobs["header"] = np.frombuffer(json.dumps(header, separators=(",", ":"), default=str).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez_compressed(f, **blobs)  # deflate: the sign bits do not shrink, the JSON and constant tensors do


def _consolidate(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """One flat array per dtype, and the index {entry: [blob, offset, shape]}."""
    parts: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    index = {}
    for key, value in arrays.items():
        value = np.asarray(value)  # (np.ascontiguousarray would turn a 0-d array into shape [1])
        blob = f"blob_{value.dtype.name}"
        index[key] = [blob, sizes.get(blob, 0), list(value.shape)]
        parts.setdefault(blob, []).append(value.reshape(-1))
        sizes[blob] = sizes.get(blob, 0) + value.size
    return {b: np.concatenate(p) for b, p in parts.items()}, index


def _read_arrays(path: Path, header: dict) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:  # reading each member checks its CRC-32
            blobs = {k: z[k] for k in z.files if k != "header"}
        out = {}
        for key, (blob, offset, shape) in header["index"].items():
            n = int(np.prod(shape)) if shape else 1
            if blob not in blobs or offset + n > blobs[blob].size:
                raise CheckpointError(f"Packed artifact '{path}' is truncated or corrupted (entry '{key}').")
            out[key] = blobs[blob][offset:offset + n].reshape(shape)
    except BestcompressError:
        raise
    except _DAMAGE as e:
        raise _damaged(path, e) from None
    return out


def read_header(path: str | Path) -> dict:
    """The JSON header of a .bcz file (format, version, spec, recipe, input shape, per-layer info, index).

    Raises:
        CheckpointError: not a .bcz file, or a truncated or corrupted one (one sentence).
    """
    path = Path(path)
    if not is_packed(path):
        raise CheckpointError(f"'{path}' is not a packed bestcompress artifact (.bcz).")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
    except _DAMAGE as e:
        raise _damaged(path, e) from None
    if not isinstance(header, dict) or not isinstance(header.get("index"), dict) \
            or not isinstance(header.get("binary"), dict) or not isinstance(header.get("state_keys"), list):
        if isinstance(header, dict) and header.get("format") not in (None, FORMAT):
            raise CheckpointError(f"'{path}' is not a packed bestcompress artifact (.bcz).")
        raise CheckpointError(f"Packed artifact '{path}' has an incomplete header; export it again.")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a packed bestcompress artifact (.bcz).")
    if header.get("version") != VERSION:
        raise CheckpointError(f"'{path}' is packed format version {header.get('version')!r}; this bestcompress "
                              f"reads version {VERSION}.")
    return header


def load_packed(path: str | Path, *, factory: str | None = None, factory_kwargs: dict | None = None,
                trust: bool = False) -> nn.Module:
    """Rebuild the binary model stored in a .bcz artifact (eval mode).

    The source architecture is rebuilt from the stored spec, binarized with the stored recipe, and given the
    stored weights; its binary weights are bit-exact and its outputs identical to the model that was packed.
    """
    from ..convert import binarize
    from ..building import build_from_spec
    from ..checkpoint import load_state_dict_checked
    from ..recipe import recipe_from_dict

    path = Path(path)
    header = read_header(path)
    shape = tuple(header["input_shape"]) if header.get("input_shape") else None
    source = build_from_spec(header["spec"], factory=factory, factory_kwargs=factory_kwargs, trust=trust,
                             source=f"Packed artifact '{path}'")  # runs no code the header names without consent
    if shape is not None:
        source.bc_input_shape = shape
    source.eval()
    recipe = recipe_from_dict(header["recipe"], source=f"{path} (stored recipe)")
    model = binarize(source, recipe=recipe, input_shape=shape).model
    arrays = _read_arrays(path, header)
    state = {}
    own = model.state_dict()
    for key in header["state_keys"]:
        layer = key[:-len(".weight")] if key.endswith(".weight") else None
        if layer in header["binary"]:
            state[key] = _unpack_layer(layer, header["binary"][layer], arrays).to(own[key].dtype)
        elif f"fp/{key}" in arrays:
            state[key] = torch.from_numpy(np.array(arrays[f"fp/{key}"]))
        else:
            raise CheckpointError(f"Packed artifact '{path}' lacks the tensor '{key}'; it is truncated or corrupted.")
    load_state_dict_checked(model, state, f"Packed artifact '{path}'", "the model it records")
    model.eval()
    model.bc_packed = {"path": str(path), "extra": header.get("extra", {})}
    return model


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict with every floating tensor in fp32 (the full-precision size)."""
    total = 0
    for v in model.state_dict().values():
        total += v.numel() * (4 if v.is_floating_point() else v.element_size())
    return total


def verify_packed(path: str | Path, model: nn.Module, data=None, samples: int | None = None, tolerance: float = 1e-4,
                  seed: int = 0):
    """Reload a .bcz artifact and compare it with `model`: binary weights bit-exact, outputs and spikes equal."""
    from .prepare import neuron_paths
    from .verify import compare, torch_forward, verification_inputs

    loaded = load_packed(path)
    shape = tuple(getattr(model, "bc_input_shape", None) or getattr(loaded, "bc_input_shape", ()))
    mismatch = None
    theirs = {n: m for n, m in loaded.named_modules() if is_binary_layer(m)}
    for name, layer in model.named_modules():
        if not is_binary_layer(layer):
            continue
        other = theirs.get(name)
        if other is None or not bool(_rows_equal(layer.binary_weight(), other.binary_weight()).all()):
            mismatch = name
            break
    batch = 2
    x, kind = verification_inputs(model, shape, batch, data, samples, seed)
    paths = neuron_paths(model)

    def run(xb):
        return torch_forward(loaded, xb, paths)

    report = compare(model, run, x, batch, paths, "pytorch (reloaded .bcz)", tolerance, kind, check_binary=False)
    report.weights_exact = mismatch is None
    report.weight_mismatch = mismatch
    return report
