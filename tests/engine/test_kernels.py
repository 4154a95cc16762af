"""Packing and popcount products: equal to float32 PyTorch on spikes and dyadic sums, both backends."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bestcompress.engine import compiled_available, kernels, use_backend

BACKENDS = ["numpy"] + (["compiled"] if compiled_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


def _spikes(g, *shape, p=0.3):
    return (torch.rand(shape, generator=g) < p).to(torch.float32)


def _signs(g, *shape):
    return torch.where(torch.rand(shape, generator=g) < 0.5, 1.0, -1.0)


def _weights(w):
    return kernels.to_columns(kernels.pack_rows((w > 0).to(torch.float32)).words)


@pytest.mark.parametrize("k,n,m", [(64, 8, 5), (100, 13, 7), (384, 40, 33), (1536, 70, 9)])
def test_binary_weight_product_equals_float(backend, k, n, m):
    g = torch.Generator().manual_seed(k + n)
    w = _signs(g, n, k)
    spikes = _spikes(g, m, k)
    stream = spikes + 0.5 * _spikes(g, m, k) + 2 * _spikes(g, m, k)  # sums of spikes and ½-couplings
    for x, planes, lsb in [(spikes, 1, 0), (stream, 3, -1)]:
        packed = kernels.pack_rows(x)
        assert (packed.planes, packed.lsb) == (planes, lsb)
        got = kernels.gemm(packed, _weights(w), n)[0]
        assert torch.equal(got, F.linear(x, w))


def test_channel_scale_and_bias_follow_the_exact_sum(backend):
    g = torch.Generator().manual_seed(1)
    w, x = _signs(g, 24, 200), _spikes(g, 6, 200)
    alpha, bias = torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g)
    got = kernels.gemm(kernels.pack_rows(x), _weights(w), 24, alpha=alpha, bias=bias)[0]
    assert torch.equal(got, F.linear(x, w) * alpha + bias)


def test_packed_words_are_the_same_on_both_backends():
    if not compiled_available():
        pytest.skip("the compiled kernels are not built")
    g = torch.Generator().manual_seed(2)
    x = _spikes(g, 9, 130) * 0.25 + _spikes(g, 9, 130)
    with use_backend("numpy"):
        a = kernels.pack_rows(x)
    with use_backend("compiled"):
        b = kernels.pack_rows(x)
    assert (a.planes, a.lsb) == (b.planes, b.lsb) == (3, -2)
    assert torch.equal(a.words, b.words) and torch.equal(a.rowsum, b.rowsum)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), 0.1, 1e-40])
def test_values_that_do_not_pack_are_refused(backend, bad):
    x = torch.zeros(2, 70)
    x[1, 5] = bad  # 0.1 is a 24-bit dyadic number: more planes than a layer allows
    assert kernels.pack_rows(x, max_planes=12) is None


def test_all_zero_input_packs_to_one_empty_plane(backend):
    packed = kernels.pack_rows(torch.zeros(3, 10))
    assert packed.planes == 1 and not bool(packed.words.any()) and not bool(packed.rowsum.any())


def test_two_packed_operands_multiply_exactly(backend):
    g = torch.Generator().manual_seed(3)
    a = _spikes(g, 6, 17, 48) * 0.125
    b = _spikes(g, 6, 21, 48) + _spikes(g, 6, 21, 48)
    pa, pb = kernels.pack_rows(a.reshape(-1, 48)), kernels.pack_rows(b.reshape(-1, 48))
    out = kernels.gemm(pa, kernels.to_columns(pb.words, 6), 21, batch=6, b_planes=pb.planes, b_lsb=pb.lsb,
                       weights=False)
    assert torch.equal(out, a @ b.transpose(-1, -2))


@pytest.mark.parametrize("kernel,stride,padding,dilation", [((3, 3), (1, 1), (1, 1), (1, 1)),
                                                             ((3, 3), (2, 2), (1, 1), (1, 1)),
                                                             ((3, 2), (1, 2), (0, 1), (2, 1))])
def test_bit_im2col_convolution_equals_conv2d(backend, kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(4)
    n, c, h, w_, cout = 2, 70, 7, 6, 12
    x = _spikes(g, n, c, h, w_)
    w = _signs(g, cout, c, *kernel)
    pixels = kernels.pack_rows(x.permute(0, 2, 3, 1).reshape(-1, c))
    patches, ho, wo = kernels.im2col(pixels, n, h, w_, kernel, stride, padding, dilation)
    cw = kernels.words_for(c)
    rows = torch.zeros(cout, kernel[0], kernel[1], cw * 64)
    rows[..., :c] = (w > 0).to(torch.float32).permute(0, 2, 3, 1)
    cols = kernels.to_columns(kernels.pack_rows(rows.reshape(cout, -1)).words)
    got = kernels.gemm(patches, cols, cout)[0].view(n, ho, wo, cout).permute(0, 3, 1, 2)
    assert torch.equal(got, F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation))


@pytest.mark.skipif(not compiled_available(), reason="the compiled kernels are not built")
@pytest.mark.parametrize("kernel,stride,padding,dilation", [((3, 3), (1, 1), (1, 1), (1, 1)),
                                                             ((1, 1), (1, 1), (0, 0), (1, 1)),
                                                             ((3, 2), (2, 1), (1, 0), (1, 2))])
def test_nchw_convolution_without_transposing_copies_equals_conv2d(kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(5)
    n, c, h, w_, cout = 2, 70, 9, 7, 12
    w = _signs(g, cout, c, *kernel)
    cw = kernels.words_for(c)
    rows = torch.zeros(cout, kernel[0], kernel[1], cw * 64)
    rows[..., :c] = (w > 0).to(torch.float32).permute(0, 2, 3, 1)
    with use_backend("compiled"):
        weight_rows = kernels.pack_rows(rows.reshape(cout, -1)).words
        bias = torch.randn(cout, generator=g)
        for x in (_spikes(g, n, c, h, w_), _spikes(g, n, c, h, w_) + 0.25 * _spikes(g, n, c, h, w_)):
            got, planes, _ = kernels.conv_nchw(x, weight_rows, cout, kernel, stride, padding, dilation)
            assert torch.equal(got, F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation))
            alpha = torch.rand(cout, generator=g) + 0.5
            scaled, _, _ = kernels.conv_nchw(x, weight_rows, cout, kernel, stride, padding, dilation, alpha, bias)
            assert torch.equal(scaled, got * alpha.view(-1, 1, 1) + bias.view(-1, 1, 1))
        assert kernels.conv_nchw(x - 0.5, weight_rows, cout, kernel, stride, padding, dilation) is None
