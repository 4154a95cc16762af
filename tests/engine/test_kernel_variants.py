"""Every compiled popcount variant (scalar, AVX2, AVX-512, NEON: those this CPU runs) and the int8 matrix-unit
route give the same floats as PyTorch, bit for bit: whole linear and convolution layers, plane masks, the fast
analysis of an input's bit planes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bestcompress.engine import compiled_available, kernels, use_kernels

pytestmark = pytest.mark.skipif(not compiled_available(), reason="the compiled kernels are not built")
ISAS = kernels.supported_isas()
AMX = compiled_available() and bool(kernels._ext.amx_available())


def _spikes(g, *shape, p=0.3):
    return (torch.rand(shape, generator=g) < p).to(torch.float32)


def _signs(g, *shape):
    return torch.where(torch.rand(shape, generator=g) < 0.5, 1.0, -1.0)


def _cols(w):
    return kernels.to_columns(kernels.pack_rows((w > 0).to(torch.float32)).words)


def _inputs(g, m, k):
    s = _spikes(g, m, k)
    multi = s + 2 * _spikes(g, m, k) + 0.5 * _spikes(g, m, k)  # 3 planes, lsb -1
    top = s.clone()
    top[3, 5] = 8.0  # plane 3 set in one row only: the other rows skip it
    return [(s, 1), (multi, 3), (top, 4)]


def test_the_variants_this_cpu_runs_include_the_portable_one():
    assert "scalar" in ISAS and kernels.isa() in ISAS
    wrong = next(i for i in kernels.ISAS if i not in ISAS)
    with pytest.raises(ValueError, match="does not run"):
        with use_kernels(isa=wrong):
            pass


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k,n,m", [(64, 8, 5), (100, 13, 7), (384, 40, 33), (1536, 70, 9)])
def test_linear_layer_equals_float_on_every_variant(isa, k, n, m):
    g = torch.Generator().manual_seed(k + n)
    w = _signs(g, n, k)
    alpha, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    with use_kernels(isa=isa, int8="off"):
        for x, planes in _inputs(g, m, k):
            out, got_planes, kernel = kernels.linear(x, _cols(w), n)
            assert (got_planes, kernel) == (planes, "popcount")
            assert torch.equal(out, F.linear(x, w))
            scaled, _, _ = kernels.linear(x, _cols(w), n, alpha, bias)
            assert torch.equal(scaled, F.linear(x, w) * alpha + bias)
        assert kernels.linear(x - 0.5, _cols(w), n) is None


@pytest.mark.parametrize("isa", ISAS)
def test_convolution_and_two_operand_product_equal_float_on_every_variant(isa):
    g = torch.Generator().manual_seed(7)
    n, c, h, w_, cout = 2, 70, 9, 7, 12
    w = _signs(g, cout, c, 3, 3)
    cw = kernels.words_for(c)
    rows = torch.zeros(cout, 3, 3, cw * 64)
    rows[..., :c] = (w > 0).to(torch.float32).permute(0, 2, 3, 1)
    a, b = _spikes(g, 6, 17, 48) * 0.125, _spikes(g, 6, 21, 48) + _spikes(g, 6, 21, 48)
    with use_kernels(isa=isa):
        weight_rows = kernels.pack_rows(rows.reshape(cout, -1)).words
        for x in (_spikes(g, n, c, h, w_), _spikes(g, n, c, h, w_) + 0.25 * _spikes(g, n, c, h, w_)):
            got, _, _ = kernels.conv_nchw(x, weight_rows, cout, (3, 3), (2, 2), (1, 1), (1, 1))
            assert torch.equal(got, F.conv2d(x, w, stride=2, padding=1))
        pa, pb = kernels.pack_rows(a.reshape(-1, 48)), kernels.pack_rows(b.reshape(-1, 48))
        out = kernels.gemm(pa, kernels.to_columns(pb.words, 6), 21, batch=6, b_planes=pb.planes, b_lsb=pb.lsb,
                           weights=False)
    assert torch.equal(out, a @ b.transpose(-1, -2))


@pytest.mark.skipif(not AMX, reason="no int8 matrix units (AMX) on this CPU")
@pytest.mark.parametrize("k,n,m", [(64, 8, 5), (100, 40, 33), (384, 70, 70)])
def test_int8_matrix_units_equal_the_popcount_product_bit_for_bit(k, n, m):
    g = torch.Generator().manual_seed(k * n)
    w = _signs(g, n, k)
    alpha, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    bn1 = (1, [torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)])
    bn2 = (2, [torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g),
               torch.randn(n, generator=g)])
    for x, planes in _inputs(g, m, k) + [(torch.zeros(m, k), 1), (_spikes(g, m, k) * 0.25, 1)]:
        for bn in (None, bn1, bn2):
            with use_kernels(int8="off"):
                ref, ref_planes, _ = kernels.linear(x, _cols(w), n, alpha, bias, bn=bn)
            with use_kernels(int8="all"):
                got, got_planes, kernel = kernels.linear(x, _cols(w), n, alpha, bias, bn=bn)
            assert kernel == ("int8" if x.any() else "popcount") and got_planes == ref_planes
            assert torch.equal(got, ref)
        assert torch.equal(got, kernels.apply_bn(F.linear(x, w) * alpha + bias, bn2, -1))
    if "BESTCOMPRESS_ENGINE_INT8" not in os.environ:  # the default on an AMX CPU: spikes on the int8 units too
        assert kernels.int8_units() == "all" and kernels.linear(_spikes(g, m, k), _cols(w), n)[2] == "int8"
    with use_kernels(int8="multi"):  # {0, 1} spikes stay on popcounts, several planes go to the int8 units
        assert kernels.linear(_spikes(g, m, k), _cols(w), n)[2] == "popcount"
        assert kernels.linear(_spikes(g, m, k) * 3, _cols(w), n)[2] == "int8"
    with use_kernels(int8="all"):  # more than 8 planes do not fit a byte: popcounts
        x = _spikes(g, m, k) + 512 * _spikes(g, m, k)
        out, planes, kernel = kernels.linear(x, _cols(w), n)
        assert (planes, kernel) == (10, "popcount") and torch.equal(out, F.linear(x, w))


@pytest.mark.parametrize("values", [[0.0, 1.0], [0.0, 0.5, 3.0], [-0.0, 1.0], [2.0 ** 30, 2.0 ** 29],
                                    [2.0 ** -70, 2.0 ** -75], [1.0, 2.0 ** -30], [1.0, 0.1], [1e-40],
                                    [2.0 ** 24, 1.0], [-1.0, 1.0], [float("inf")], [0.0]])
def test_fast_plane_analysis_agrees_with_the_exact_one(values):
    x = torch.zeros(1000)
    x[torch.arange(len(values)) * 97] = torch.tensor(values)
    got = kernels._ext.analyze(x.data_ptr(), x.numel())
    want = kernels._np_analyze(x.numpy())
    assert tuple(got) == tuple(want)


def test_a_fraction_next_to_spikes_leaves_the_spike_fast_path():
    g = torch.Generator().manual_seed(9)
    w = _signs(g, 16, 130)
    x = _spikes(g, 4, 130)
    x[2, 129] = 0.5  # largest value still 1.0
    for int8 in ("off", "multi"):
        with use_kernels(int8=int8):
            out, planes, _ = kernels.linear(x, _cols(w), 16)
        assert planes == 2 and torch.equal(out, F.linear(x, w))
    assert np.isfinite(out.numpy()).all()


@pytest.mark.parametrize("int8", ["off", "all"])
def test_a_transposed_view_is_read_in_place(int8):
    g = torch.Generator().manual_seed(10)
    w = _signs(g, 24, 70)
    tokens_last = _spikes(g, 3, 70, 13) + _spikes(g, 3, 70, 13)  # [B, C, N] memory
    x = tokens_last.transpose(-1, -2)  # [B, N, C] view: Spikformer's tokens x channels
    assert not x.is_contiguous()
    with use_kernels(int8=int8):
        out, planes, _ = kernels.linear(x, _cols(w), 24)
    assert planes == 2 and torch.equal(out.view(3, 13, 24), F.linear(x, w))


@pytest.mark.parametrize("planes,lsb", [(2, 0), (8, -3), (8, 4), (9, 0), (12, -6)])
def test_inputs_of_up_to_and_beyond_eight_planes_pack_exactly(planes, lsb):
    """Up to 8 planes take the one-pass byte route, more take analyze + pack: the same planes, lsb and floats."""
    g = torch.Generator().manual_seed(11)
    w = _signs(g, 40, 200)
    q = torch.randint(0, 2 ** planes, (37, 200), generator=g)
    q[0, 0], q[1, 1] = 2 ** (planes - 1), 1  # the top plane and the lowest plane are both set
    x = torch.ldexp(q.to(torch.float32), torch.tensor(lsb))
    packed = kernels.pack_rows(x)
    assert (packed.planes, packed.lsb) == (planes, lsb)
    with use_kernels(int8="off"):
        out, got_planes, _ = kernels.linear(x, _cols(w), 40, max_planes=12)
        assert got_planes == planes and torch.equal(out, F.linear(x, w))
        assert kernels.linear(x, _cols(w), 40, max_planes=planes - 1) is None  # too many planes: refused
        x[5, 7] = 0.1 * 2.0 ** lsb  # not a dyadic number of a few planes
        assert kernels.linear(x, _cols(w), 40, max_planes=12) is None


def test_a_fraction_among_spikes_leaves_the_convolution_spike_path():
    g = torch.Generator().manual_seed(12)
    x = _spikes(g, 2, 70, 9, 7)
    x[1, 66, 4, 5] = 0.5  # largest value still 1.0
    w = _signs(g, 12, 70, 3, 3)
    rows = torch.zeros(12, 3, 3, 128)
    rows[..., :70] = (w > 0).to(torch.float32).permute(0, 2, 3, 1)
    weight_rows = kernels.pack_rows(rows.reshape(12, -1)).words
    got, planes, _ = kernels.conv_nchw(x, weight_rows, 12, (3, 3), (1, 1), (1, 1), (1, 1))
    assert planes == 2 and torch.equal(got, F.conv2d(x, w, padding=1))


def test_a_transposed_view_of_whole_and_partial_16_by_16_blocks_is_gathered_exactly():
    g = torch.Generator().manual_seed(13)
    w = _signs(g, 20, 40)
    tokens_last = _spikes(g, 2, 40, 37) + 0.5 * _spikes(g, 2, 40, 37)  # K = 40, 37 tokens: full and edge blocks
    x = tokens_last.transpose(-1, -2)
    with use_kernels(int8="off"):
        out, planes, _ = kernels.linear(x, _cols(w), 20)
    assert planes == 2 and torch.equal(out.view(2, 37, 20), F.linear(x, w))


@pytest.mark.skipif(not AMX, reason="no int8 matrix units (AMX) on this CPU")
@pytest.mark.parametrize("n,c,h,w,cout,kernel,stride,padding,dilation", [
    (2, 20, 16, 16, 40, (3, 3), (1, 1), (1, 1), (1, 1)),   # channels and outputs not whole tiles
    (1, 70, 5, 16, 33, (3, 3), (1, 1), (1, 1), (1, 1)),    # 80 output pixels: a last block of 16
    (1, 64, 9, 34, 32, (3, 3), (2, 2), (1, 0), (1, 1)),    # stride 2, padding on one axis only
    (2, 48, 12, 16, 24, (3, 5), (1, 1), (2, 4), (2, 2)),   # dilation, a rectangular kernel
    (1, 130, 4, 16, 64, (1, 1), (1, 1), (0, 0), (1, 1)),   # three channel words
])
def test_int8_convolution_equals_the_popcount_one_bit_for_bit(n, c, h, w, cout, kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(c * cout)
    wts = _signs(g, cout, c, *kernel)
    cw = (c + 63) // 64
    rows = torch.zeros(cout, kernel[0], kernel[1], 64 * cw)
    rows[..., :c] = (wts > 0).to(torch.float32).permute(0, 2, 3, 1)
    weight_rows = kernels.pack_rows(rows.reshape(cout, -1)).words
    alpha, bias = torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)
    bn1 = (1, [torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)])
    bn2 = (2, [torch.randn(cout, generator=g), torch.rand(cout, generator=g) + 0.5, torch.rand(cout, generator=g),
               torch.randn(cout, generator=g)])
    s = _spikes(g, n, c, h, w)
    multi = s + 4 * _spikes(g, n, c, h, w) + 0.5 * _spikes(g, n, c, h, w)
    for x in (s, multi, s * 0.25):
        for scale, shift, bn in ((None, None, None), (alpha, bias, bn1), (alpha, None, bn2)):
            args = (x, weight_rows, cout, kernel, stride, padding, dilation, scale, shift)
            with use_kernels(int8="off"):
                ref, ref_planes, ref_kernel = kernels.conv_nchw(*args, bn=bn)
            with use_kernels(int8="all"):
                got, planes, kernel_used = kernels.conv_nchw(*args, bn=bn)
            assert (ref_kernel, kernel_used, planes) == ("popcount", "int8", ref_planes)
            assert torch.equal(got, ref)
        want = F.conv2d(x, wts, None, stride, padding, dilation) * alpha.view(-1, 1, 1)
        assert torch.equal(ref, kernels.apply_bn(want, bn2, 1))
    shape = (weight_rows, cout, kernel, stride, padding, dilation)
    with use_kernels(int8="all"):  # output rows that are not groups of 16 columns, zeros, 10 planes: popcounts
        narrow = s[..., :w - stride[1]]  # one output column less
        assert kernels.conv_nchw(narrow, *shape)[2] == "popcount"
        assert torch.equal(kernels.conv_nchw(narrow, *shape)[0], F.conv2d(narrow, wts, None, stride, padding, dilation))
        assert kernels.conv_nchw(s * 0, *shape)[2] == "popcount"
        assert kernels.conv_nchw(s * 512 + s, *shape)[2] == "popcount"
        assert kernels.conv_nchw(-s, *shape) is None
