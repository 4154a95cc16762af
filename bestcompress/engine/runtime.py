"""The Engine: a compiled binary model you call with a batch and get logits from."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from . import kernels
from .layers import MATMUL_STATS, PackedConv, PackedLinear, _PackedLayer
from .plan import Plan, compile_model


def _logits(out, model: nn.Module | None = None, batch: int | None = None) -> torch.Tensor:
    """The logits by the rule of `training.outputs.select_logits` (per-time-step logits averaged over T)."""
    from ..errors import ModelError
    from ..training.outputs import select_logits
    try:
        return select_logits(out, False, model, batch)
    except ModelError as e:
        raise DataError(str(e)) from None


class Engine:
    """A binary model compiled for 1-bit inference: packed sign bits and popcount products (see plan.py).

    Args:
        model: the binary model (it is copied unless `copy_model` is False).
        input_shape: the per-sample input shape (default: the model's own record of it).
        source: where the model came from, for messages.
    """

    def __init__(self, model: nn.Module, input_shape=None, source: str | None = None, copy_model: bool = True):
        from ..model_facts import model_input_shape

        shape = input_shape or getattr(model, "bc_input_shape", None) or model_input_shape(model)
        self.input_shape = tuple(shape) if shape is not None else None
        self.model, self.plan = compile_model(model, copy_model=copy_model)
        self.source = source
        self.peak_layer_bytes = 0

    # ------------------------------------------------------------------------------------------ running

    def _as_batch(self, batch) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        if not isinstance(x, torch.Tensor):
            raise DataError(f"The engine takes a NumPy array or a torch tensor, not a {type(batch).__name__}.")
        x = x.detach().to(torch.float32)
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            if tuple(x.shape) == self.input_shape:
                x = x.unsqueeze(0)
            else:
                raise DataError(f"The input has shape {list(x.shape)}, but the model takes batches of "
                                f"{list(self.input_shape)} (shape [batch, {', '.join(map(str, self.input_shape))}]).")
        return x

    def __call__(self, batch) -> torch.Tensor:
        """Logits of a batch ([B, *input_shape], NumPy or torch)."""
        x = self._as_batch(batch)
        with torch.no_grad():
            return _logits(self.model(x), self.model, len(x))

    def predict(self, batch) -> np.ndarray:
        """Top-1 class of every sample."""
        return self(batch).argmax(-1).numpy()

    # ------------------------------------------------------------------------------------------ facts

    def packed_layers(self) -> dict[str, _PackedLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, (PackedLinear, PackedConv))}

    def stats(self) -> dict:
        """How many calls took the popcount path and how many the float path, per layer and for matmuls."""
        layers = {n: dict(m.stats) for n, m in self.packed_layers().items()}
        return {"layers": layers, "matmul": dict(MATMUL_STATS)}

    def reset_stats(self) -> None:
        for m in self.packed_layers().values():
            m.stats = {"packed": 0, "float": 0}
        MATMUL_STATS.update(packed=0, float=0)

    def memory(self, batch: int = 1) -> dict:
        """Bytes in RAM: packed binary weights (sign bits in 64-bit words, plus α and bias), the other
        parameters and buffers (full-precision first layer, heads, normalizations), and the activations of one
        forward at `batch` (the largest input + output + packed operand of any packed layer, measured; for the
        int8 route, the input's bytes and one column block of weight bytes, expanded per call)."""
        layers = self.packed_layers()
        packed = sum(m.weight_bytes for m in layers.values())
        sign_bits = sum(m.weight_bits for m in layers.values())
        seen = {id(t) for m in layers.values() for t in m.buffers()}
        other = sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers())
                    if id(t) not in seen)
        act = self._activation_bytes(batch) if self.input_shape is not None else None
        return {"packed_weight_bytes": int(packed), "sign_bit_bytes": int((sign_bits + 7) // 8),
                "other_bytes": int(other), "activation_bytes": act, "binary_layers": len(layers),
                "layers_kept_in_pytorch": dict(self.plan.kept)}

    def _activation_bytes(self, batch: int) -> int:
        peak = [0]

        def hook(mod, args, out):
            x = args[0]
            cin = x.shape[1] if isinstance(mod, PackedConv) else x.shape[-1]
            planes = max(1, mod.last_planes)
            rows = x.numel() // max(1, cin)
            kw = mod.weight_words.shape[-1 if mod.rows_layout else -2]
            operand = planes * rows * kw * 8  # bit planes of the input (convolutions: its bit im2col)
            if mod.last_kernel == "int8" and isinstance(mod, PackedConv):  # bk_amx_conv.c: the bordered byte
                n, _, h, w = x.shape if x.dim() == 4 else (x.shape[0], 0, 1, x.shape[-1])  # image, its pixel sums,
                (ph, pw), cw = mod.padding, mod.cw  # one output sum per pixel, one block of weight bytes
                pixels = n * (h + 2 * ph) * (w + 2 * pw)
                operand = pixels * (cw * 64 + 4) + out.numel() // mod.out_features * 8 + 2 * kw * 1024
            elif mod.last_kernel == "int8":  # bytes for the matrix units, and one column block of weight bytes
                operand = (rows + 31) // 32 * 32 * kw * 64 + 2 * kw * 1024
            peak[0] = max(peak[0], x.numel() * 4 + out.numel() * 4 + operand)

        handles = [m.register_forward_hook(hook) for m in self.packed_layers().values()]
        try:
            g = torch.Generator().manual_seed(0)
            self(torch.rand((batch,) + self.input_shape, generator=g))
        finally:
            for h in handles:
                h.remove()
        return int(peak[0])

    def describe(self) -> str:
        return (f"{len(self.plan.packed)} packed binary layers ({len(self.plan.folded)} with their BatchNorm folded), "
                f"{self.plan.matmuls} popcount matmuls, "
                f"{len(self.plan.kept)} binary layers kept in PyTorch; {kernels.backend_description()}")


def from_model(model: nn.Module, input_shape=None) -> Engine:
    """An Engine for a binary model in memory (the model itself is left unchanged)."""
    return Engine(model, input_shape=input_shape)


def load(path: str | os.PathLike) -> Engine:
    """An Engine for a packed .bcz artifact (the PyTorch model is rebuilt, then compiled; its float copies of
    the binary weights are dropped).

    Args:
        path: a .bcz file written by `bestcompress export --format packed`.
    Returns:
        An Engine: `engine(batch) -> logits`.
    """
    from ..exporters.packed import load_packed, read_header

    path = Path(path)
    header = read_header(path)  # a clear error when it is not a .bcz
    model = load_packed(path)
    shape = header.get("input_shape")
    return Engine(model, input_shape=tuple(shape) if shape else None, source=str(path), copy_model=False)


__all__ = ["Engine", "Plan", "from_model", "load", "memory_line", "packed_memory"]


def packed_memory(loaded) -> dict | None:
    """The engine's memory for a loaded .bcz (`bc.load`'s Loaded), for `inspect`; None for other kinds."""
    if getattr(loaded, "kind", None) != "packed":
        return None
    shape = (loaded.info or {}).get("input_shape")
    return Engine(loaded.model, input_shape=tuple(shape) if shape else None).memory()


def memory_line(mem: dict) -> str:
    act = mem.get("activation_bytes")
    act_text = f", activations {act / 1e6:.3f} MB (largest layer, batch 1)" if act else ""
    return (f"1-bit engine memory: packed binary weights {mem['packed_weight_bytes'] / 1e6:.3f} MB (sign bits "
            f"{mem['sign_bit_bytes'] / 1e6:.3f} MB), other parameters {mem['other_bytes'] / 1e6:.3f} MB{act_text}")
