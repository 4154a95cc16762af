"""Saved spikes stored as bits (nn/memory.py): exact round trip, gradients equal to the unpacked path for the fused
kernel and the plain loop, 1/32 of the bytes, and nothing packed that is not a neuron's untouched output."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bestcompress.nn.lif import IF, LIF, ParametricLIF
from bestcompress.nn.memory import SavedTally, is_marked, mark_spikes, pack_bits, packed_spikes, unpack_bits


@pytest.mark.parametrize("shape", [(5,), (3, 7, 11), (2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pack_round_trip_is_exact(shape, dtype):
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.6).to(dtype)
    p = pack_bits(x)
    assert p.nbytes == -(-x.numel() // 8)
    y = unpack_bits(p)
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(x, y)


def test_pack_layout_is_one_bit_per_element_little_endian():
    x = torch.zeros(24)
    x[:8] = 1  # a full byte: bit 63 of the int64 word is set (the sign bit)
    x[8] = x[23] = 1
    assert pack_bits(x).bits.tolist() == [255, 1, 128]
    t = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)).gt(0.5).float().t()  # not contiguous
    assert torch.equal(unpack_bits(pack_bits(t)), t)


def _grads(neuron: nn.Module, backend: str, pack: bool, monkeypatch, tally=None):
    monkeypatch.setenv("BESTCOMPRESS_LIF", backend)
    torch.manual_seed(0)
    fc = nn.Linear(64, 16)
    x = (1.5 * torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    with packed_spikes(pack, tally):
        s = neuron(x)
        out = fc(s.flatten(0, 1))  # the linear layer saves its input (the spikes) for its weight gradient
        out = out @ s[:, :, :16].flatten(0, 1).transpose(0, 1)  # a view of the spikes, saved by a matmul
    out.square().sum().backward()
    return x.grad, fc.weight.grad, s.detach()


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("make", [lambda: LIF(), lambda: LIF(v_reset=None, detach_reset=False), lambda: IF(),
                                  lambda: ParametricLIF(surrogate="atan")])
def test_gradients_equal_unpacked_path(backend, make, monkeypatch):
    plain = _grads(make(), backend, False, monkeypatch)
    packed_tally, plain_tally = SavedTally(), SavedTally()
    packed = _grads(make(), backend, True, monkeypatch, packed_tally)
    _grads(make(), backend, False, monkeypatch, plain_tally)
    assert plain[2].sum() > 0 and (plain[2] == 0).any()  # the neuron fired, not everywhere
    for a, b in zip(plain, packed):
        assert torch.equal(a, b)
    assert packed_tally.bytes < plain_tally.bytes  # the spikes the linear layer and the matmul kept are bits


def test_spike_input_of_a_layer_is_saved_as_bits(monkeypatch):
    x = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    fc = nn.Linear(64, 16, bias=False)
    sizes = {}
    for pack in (False, True):
        tally = SavedTally()
        with packed_spikes(pack, tally):
            s = LIF()(x)
            fc(s)
        sizes[pack] = tally.bytes
    spikes = 4 * 8 * 64 * 4  # float32 spikes the linear layer keeps without packing
    assert sizes[False] - sizes[True] == spikes - spikes // 32


def test_only_untouched_marked_tensors_are_packed():
    with packed_spikes():
        s = mark_spikes((torch.rand(100) > 0.5).float())
        view = s.view(10, 10)[:, 2:]
        other = (torch.rand(100) > 0.5).float()
        assert is_marked(s) and is_marked(view) and not is_marked(other)
        s.mul_(2.0)  # written after the neuron emitted it: no longer known to be 0/1
        assert not is_marked(s) and not is_marked(view)
    with packed_spikes():  # a fresh block forgets what an earlier one saw
        assert not is_marked(other)
    assert mark_spikes(other) is other and not is_marked(other)  # outside any block: nothing recorded
