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

How the sign bits rebuild the binary weights bit-exactly is `packing.py`'s job.
"""
from __future__ import annotations

import json
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BestcompressError, CheckpointError, ExportError, short_reason
from ..nn.binary import is_binary_layer
from .formats import ExportFormat, ExportOptions, ExportResult, path_bytes, register_format, write_verified
from .packing import pack_layer, rows_equal, unpack_layer
from .verify import compare, torch_forward, verification_inputs

FORMAT = "bestcompress-packed"
VERSION = 1
MAGIC = b"PK\x03\x04"


# ------------------------------------------------------------------------------------------------ the file

# What a damaged archive raises while it is read (zip structure, deflate stream, CRC, .npy header, JSON).
_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, struct.error, TypeError,
           IndexError, UnicodeDecodeError, SyntaxError, tokenize.TokenError)  # the last two: a damaged .npy header


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
        pack_layer(name, layer, arrays, layers)
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
    arrays = _read_arrays(path, header)  # every member's CRC is checked before any work
    shape = tuple(header["input_shape"]) if header.get("input_shape") else None
    source = build_from_spec(header["spec"], factory=factory, factory_kwargs=factory_kwargs, trust=trust,
                             source=f"Packed artifact '{path}'")  # runs no code the header names without consent
    if shape is not None:
        source.bc_input_shape = shape
    source.eval()
    recipe = recipe_from_dict(header["recipe"], source=f"{path} (stored recipe)")
    model = binarize(source, recipe=recipe, input_shape=shape).model
    state = {}
    own = model.state_dict()
    for key in header["state_keys"]:
        layer = key[:-len(".weight")] if key.endswith(".weight") else None
        try:
            if layer in header["binary"] and key in own:
                state[key] = unpack_layer(layer, header["binary"][layer], arrays).to(own[key].dtype)
            elif f"fp/{key}" in arrays:
                state[key] = torch.from_numpy(np.array(arrays[f"fp/{key}"]))
            else:
                raise CheckpointError(f"Packed artifact '{path}' lacks the tensor '{key}'; it is truncated or "
                                      "corrupted.")
        except _DAMAGE as e:
            raise _damaged(path, e) from None
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


def _structure(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def verify_packed(path: str | Path, model: nn.Module, data=None, samples: int | None = None, tolerance: float = 1e-4,
                  seed: int = 0, loaded: nn.Module | None = None):
    """Reload a .bcz artifact and compare it with `model`: binary weights bit-exact, outputs and spikes equal.

    Raises:
        ExportError: the artifact holds another model than `model` (other layers or shapes).
    """
    from .prepare import neuron_paths

    path = Path(path)
    # The factory that built `model` (already run in this process, with the user's consent) rebuilds the artifact.
    spec = getattr(model, "bc_spec", None) or {}
    loaded = loaded if loaded is not None else load_packed(path, factory=spec.get("factory"))
    mine, theirs_shapes = _structure(model), _structure(loaded)
    if mine != theirs_shapes:
        diff = sorted(set(mine) ^ set(theirs_shapes)) or [k for k in mine if mine[k] != theirs_shapes[k]]
        raise ExportError(f"'{path}' holds another model than the one it is verified against (they differ at "
                          f"'{diff[0]}'); verify against the checkpoint it was exported from.")
    shape = tuple(getattr(model, "bc_input_shape", None) or getattr(loaded, "bc_input_shape", ()))
    mismatch = None
    theirs = {n: m for n, m in loaded.named_modules() if is_binary_layer(m)}
    for name, layer in model.named_modules():
        if not is_binary_layer(layer):
            continue
        other = theirs.get(name)
        if other is None or not bool(rows_equal(layer.binary_weight(), other.binary_weight()).all()):
            mismatch = name
            break
    batch = 2
    x, kind = verification_inputs(model, shape, batch, data, samples, seed)
    paths = neuron_paths(model)

    def run(xb, feeds):
        out, spikes, _ = torch_forward(loaded, xb, paths)
        return out, spikes

    report = compare(model, run, x, batch, paths, "pytorch (reloaded .bcz)", tolerance, kind, check_binary=False)
    report.weights_exact = mismatch is None
    report.weight_mismatch = mismatch
    return report


# ------------------------------------------------------------------------------------------------ the format

def _export(model: nn.Module, path: Path, opts: ExportOptions) -> ExportResult:
    opts.progress("packing the binary weights (1 bit each)")
    report = write_verified(
        path, lambda tmp: write_packed(model, tmp),
        lambda tmp: verify_packed(tmp, model, opts.data, opts.samples, opts.tolerance, opts.seed)
        if opts.verify else None, "The packed artifact")
    return ExportResult(path, "packed", path_bytes(path), 0, report)


def _verify(path: Path, model: nn.Module, opts: ExportOptions):
    return verify_packed(path, model, opts.data, opts.samples, opts.tolerance, opts.seed)


register_format(ExportFormat(
    "packed", "1 bit per binary weight (.bcz), everything else fp32; bestcompress.load() rebuilds the model", ".bcz",
    _export, _verify, is_packed))
