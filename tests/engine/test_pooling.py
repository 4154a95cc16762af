"""SeparableMaxPool2d equals nn.MaxPool2d bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bestcompress.engine import compiled_available, use_backend
from bestcompress.engine.pooling import SeparableMaxPool2d

BACKENDS = ["numpy"] + (["compiled"] if compiled_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (2, 2, 0), ((3, 2), (1, 2), (1, 0)), (3, None, 1)])
def test_equals_torch_max_pool(kernel, stride, padding, backend):
    pool = nn.MaxPool2d(kernel, stride, padding)
    assert SeparableMaxPool2d.supports(pool)
    ours = SeparableMaxPool2d(pool)
    g = torch.Generator().manual_seed(0)
    with_nan = torch.randn(2, 5, 9, 8, generator=g)
    with_nan[1, 2, 4, 3] = float("nan")
    with use_backend(backend):
        for x in ((torch.rand(2, 5, 9, 8, generator=g) < 0.3).float(), torch.randn(2, 5, 9, 8, generator=g),
                  torch.randn(2, 9, 8, 5, generator=g).permute(0, 3, 1, 2)):  # not contiguous
            assert torch.equal(ours(x), pool(x))
        got, want = ours(with_nan), pool(with_nan)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_unsupported_pools_are_left_alone():
    assert not SeparableMaxPool2d.supports(nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    assert not SeparableMaxPool2d.supports(nn.MaxPool2d(3, 2, 1, dilation=2))
    assert not SeparableMaxPool2d.supports(nn.MaxPool2d(3, 2, 1, return_indices=True))
