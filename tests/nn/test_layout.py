"""Memory order of dense tensors (nn/layout.py) and the kernels that keep a channels-last layout: the fused LIF
and the spike packer give the same values as on contiguous input, in the input's layout, without copying it."""
from __future__ import annotations

import pytest
import torch

from bestcompress.nn.layout import as_dense, dense_order, restore
from bestcompress.nn.lif import LIF
from bestcompress.nn.lif_kernel import lif_backend
from bestcompress.nn.memory import pack_bits, unpack_bits

CL = torch.channels_last


def _cl5(T=2, B=3, C=5, H=4, W=6, spikes=False):
    """A time-first [T, B, C, H, W] view of a channels-last [T·B, C, H, W] tensor (what a tokenizer's LIF gets)."""
    x = torch.randn(T * B, C, H, W, generator=torch.Generator().manual_seed(0))
    if spikes:
        x = (x > 0.3).float()
    return x.contiguous(memory_format=CL).reshape(T, B, C, H, W)


def test_dense_order_finds_the_memory_order():
    x = torch.randn(2, 3, 4, 5)
    assert dense_order(x) == [0, 1, 2, 3]
    assert dense_order(x.contiguous(memory_format=CL)) == [0, 2, 3, 1]
    assert dense_order(_cl5(), lead=1) == [0, 1, 3, 4, 2]
    assert dense_order(x[:, :, ::2]) is None  # gapped memory
    assert dense_order(x.transpose(0, 1), lead=1) is None  # the lead dim is not the outer one in memory


def test_as_dense_views_and_restores():
    x = _cl5()
    xd, order = as_dense(x, lead=1)
    assert xd.is_contiguous() and xd.data_ptr() == x.data_ptr()  # a view, no copy
    back = restore(xd, order)
    assert torch.equal(back, x) and back.stride() == x.stride()
    gapped = torch.randn(4, 6)[:, ::2]
    xd, order = as_dense(gapped)
    assert order is None and xd.is_contiguous() and torch.equal(restore(xd, order), gapped)


@pytest.mark.parametrize("x", [_cl5(spikes=True), (torch.randn(6, 5, 4, 3) > 0).float().contiguous(memory_format=CL),
                               (torch.randn(4, 9, 7) > 0).float(), (torch.randn(4, 10) > 0).float()[:, ::3]])
def test_pack_round_trip_keeps_values_and_layout(x):
    p = pack_bits(x)
    y = unpack_bits(p)
    assert p.bits.numel() == (x.numel() + 7) // 8
    assert torch.equal(y, x) and y.dtype == x.dtype
    if dense_order(x) is not None:
        assert y.stride() == x.stride()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fused_lif_on_channels_last_input_equals_contiguous(backend, monkeypatch):
    monkeypatch.setenv("BESTCOMPRESS_LIF", backend)
    x_cl = (2.0 * _cl5(T=4)).requires_grad_(True)
    x_c = x_cl.detach().contiguous().requires_grad_(True)
    g = torch.randn(x_c.shape, generator=torch.Generator().manual_seed(1))
    s_cl, s_c = LIF()(x_cl), LIF()(x_c)
    assert s_cl.stride() == x_cl.stride()  # the spikes keep the input's channels-last layout
    assert torch.equal(s_cl, s_c) and 0 < s_c.mean() < 1
    s_cl.backward(g)
    s_c.backward(g)
    if lif_backend("cpu")[0] == "cpp":  # one scalar loop per element: the same sums in any memory order
        assert torch.equal(x_cl.grad, x_c.grad)
    else:  # torch's vectorised elementwise ops round a few elements differently at other memory positions
        assert torch.allclose(x_cl.grad, x_c.grad, rtol=1e-6, atol=1e-7)
