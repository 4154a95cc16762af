"""devices.resolve_device: a name means a device on this machine, or one sentence says why not."""
from __future__ import annotations

import pytest
import torch

from bestcompress.devices import resolve_device
from bestcompress.errors import BestcompressError, DeviceError


def test_cpu_and_default():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == expected


@pytest.mark.parametrize("name", ["bogus", "gpu", "cuda:x", "cuda:-1", "cpu:0:1", ""])
def test_unknown_names(name):
    with pytest.raises(DeviceError, match="Unknown device") as e:
        resolve_device(name)
    assert isinstance(e.value, BestcompressError) and "\n" not in str(e.value)


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device(name)


def test_cuda_index_beyond_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
