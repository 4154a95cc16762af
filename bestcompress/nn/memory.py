"""Saved spike tensors stored bit-packed (1 bit per spike instead of 32) while autograd keeps them for backward.

A spike tensor is saved for backward by the layers that consume it (a convolution or linear layer keeps its
input to compute its weight gradient, a matmul keeps both operands), as a float tensor of 0s and 1s. Inside
`packed_spikes()` every tensor that a bestcompress neuron emitted (`mark_spikes`, called by nn/lif.py for the
fused kernel's and the plain loop's outputs) is stored as bits when autograd saves it, and unpacked (same values,
same dtype and shape) when backward needs it: gradients are bit for bit those of the unpacked path.

How a saved tensor is recognised as spikes: `mark_spikes` records the tensor's storage (by a weak reference, so
nothing is kept alive) and its version counter; a saved tensor that views that same storage, not written to since
(same version), holds only 0s and 1s. Nothing is checked by value, so the cost is one dictionary look-up per saved
tensor. The neurons' own surrogate gradient needs the membrane H (a float); the fused kernel saves only H and
derives the spike from it (H >= V_th), so no neuron saves a spike tensor of its own.

Used by the training forward in every `train.memory` mode (training/memory.py); outside the context, marking is
a no-op.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .layout import as_dense, restore
from .local_flag import setting

_local = threading.local()
_SHIFTS = torch.arange(8, dtype=torch.uint8)
MIN_PACKED = 64  # smaller tensors are kept as they are (the bookkeeping would cost more than it saves)


def _registry() -> dict | None:
    return getattr(_local, "registry", None)


def mark_spikes(t: torch.Tensor) -> torch.Tensor:
    """Record that `t` holds only 0s and 1s (a neuron's output), so that a saved view of it is stored as bits.

    A no-op outside `packed_spikes()`; returns `t`.
    """
    reg = _registry()
    if reg is None or type(t) is not torch.Tensor or t.layout is not torch.strided or t.numel() < MIN_PACKED:
        return t
    storage = t.untyped_storage()
    reg[storage.data_ptr()] = (weakref.ref(storage), t._version)
    return t


def neuron_output(t: torch.Tensor) -> torch.Tensor:
    """What a neuron's forward returns its spikes through: marked (`mark_spikes`) and shown to the spike log
    (`spike_log`) when one is open. Returns `t`."""
    mark_spikes(t)
    log = getattr(_local, "spike_log", None)
    if log is not None:
        log(t)
    return t


@contextmanager
def spike_marks():
    """Within the block, neuron outputs are marked (`is_marked` answers for them) even where nothing is packed
    (nn/bf16.py reads the marks); inside an open registry (packed_spikes) it changes nothing."""
    opened = _registry() is None
    if opened:
        _local.registry = {}
    try:
        yield
    finally:
        if opened:
            _local.registry = None


def spike_log(fn):
    """Within the block, every neuron output passes through `fn` (training/reversible.py records the forward's
    spikes and checks a recomputation's against them)."""
    return setting(_local, "spike_log", fn)


@dataclass
class PackedBits:
    """A tensor of 0s and 1s as 1 bit per element (little-endian within each byte)."""

    bits: torch.Tensor  # uint8, ceil(numel / 8) bytes, in the tensor's memory order
    shape: torch.Size  # of the tensor in memory order
    dtype: torch.dtype
    order: list[int] | None = None  # the permutation back to the packed tensor (nn/layout.py); None: as packed

    @property
    def nbytes(self) -> int:
        return self.bits.numel()


_GATHER = 0x0102040810204080  # v * _GATHER >> 56: the low bits of 8 bytes (each 0 or 1) as one byte


def pack_bits(x: torch.Tensor) -> PackedBits:
    """`x` (only 0s and 1s) as PackedBits.

    The 0/1 bytes of eight consecutive elements are read as one int64 v; v * 0x0102040810204080 puts byte i at
    bit 56 + i with no carries, so (v * M) >> 56 is the packed byte (three integer ops per 8 elements)."""
    xd, order = as_dense(x)  # in memory order: a channels-last tensor comes back channels-last
    flat = (xd != 0).reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)
    return PackedBits(((words * _GATHER) >> 56).to(torch.uint8), xd.shape, x.dtype, order)


def unpack_bits(p: PackedBits) -> torch.Tensor:
    """The tensor `pack_bits` packed (same shape, dtype and values; a dense tensor's strides too)."""
    n = 1
    for d in p.shape:
        n *= d
    bits = (p.bits.unsqueeze(1) >> _SHIFTS.to(p.bits.device)) & 1
    return restore(bits.reshape(-1)[:n].to(p.dtype).view(p.shape), p.order)


def is_marked(x: torch.Tensor) -> bool:
    """True when `x` views the storage of a tensor `mark_spikes` recorded, unchanged since."""
    reg = _registry()
    if not reg or type(x) is not torch.Tensor or x.layout is not torch.strided or not x.dtype.is_floating_point:
        return False
    storage = x.untyped_storage()
    entry = reg.get(storage.data_ptr())
    return entry is not None and entry[0]() is storage and entry[1] == x._version


class SavedTally:
    """Bytes autograd keeps for backward, each storage counted once (what the memory benchmark reports).

    The tally holds every storage it counted until it is dropped: a tensor saved for a graph that is freed during
    the forward (an inner graph of a recomputed segment) would otherwise give its address to a later saved tensor,
    which would then not be counted (the figure varied from run to run with the allocator)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.tensors = 0
        self._seen: dict[int, torch.UntypedStorage] = {}

    def add(self, obj) -> None:
        if isinstance(obj, PackedBits):
            self.bytes += obj.nbytes
            self.tensors += 1
            return
        if type(obj) is not torch.Tensor or obj.layout is not torch.strided:
            return
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        self.tensors += 1
        if key not in self._seen:  # held here, so no other storage can take this address during the tally
            self._seen[key] = storage
            self.bytes += storage.nbytes()


def _hooks(pack: bool, tally: SavedTally | None):
    def pack_hook(x: torch.Tensor):
        out = pack_bits(x) if pack and x.numel() >= MIN_PACKED and is_marked(x) else x
        if tally is not None:
            tally.add(out)
        return out

    def unpack_hook(p):
        return unpack_bits(p) if isinstance(p, PackedBits) else p
    return pack_hook, unpack_hook


@contextmanager
def packed_spikes(enabled: bool = True, tally: SavedTally | None = None):
    """Within the block, spike tensors that autograd saves are stored as bits (module docstring).

    Args:
        enabled: pack (False: store everything as it is, e.g. to measure the plain path).
        tally: when given, counts the bytes of everything saved (after packing); a block nested inside one
            with a tally counts into that tally.
    """
    outer_tally = getattr(_local, "tally", None)
    tally = tally if tally is not None else outer_tally
    if not enabled and tally is None:
        yield
        return
    outer = _registry()
    _local.registry = {} if outer is None else outer
    _local.tally = tally
    try:
        with torch.autograd.graph.saved_tensors_hooks(*_hooks(enabled, tally)):
            yield
    finally:
        _local.registry, _local.tally = outer, outer_tally
