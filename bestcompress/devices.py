"""Which torch device a name means: `resolve_device('cuda:1')`, with one sentence when it cannot be used."""
from __future__ import annotations

import re

import torch

from .errors import DeviceError

_NAME_RE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def resolve_device(name: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """The torch.device that `name` means on this machine.

    Args:
        name: 'cpu', 'cuda', 'cuda:N', 'mps', a torch.device, or None (CUDA when available, else the CPU).
        local_rank: the CUDA device index used for a bare 'cuda' or None (one process per GPU under torchrun).
    Returns:
        The device.
    Raises:
        DeviceError: an unknown name, CUDA/MPS asked for where it is not available, or a CUDA index too large.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    text = str(name).strip().lower()
    m = _NAME_RE.fullmatch(text)
    if m is None:
        raise DeviceError(f"Unknown device '{name}'; use cpu, cuda, cuda:N or mps.")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"Device '{name}' was asked for, but this machine has no usable Apple MPS device; "
                              "use --device cpu.")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(f"Device '{name}' was asked for, but CUDA is not available here (torch "
                          f"{torch.__version__}); use --device cpu.")
    count = torch.cuda.device_count()
    i = int(index) if index is not None else local_rank
    if i >= count:
        raise DeviceError(f"Device '{name}' does not exist: this machine has {count} CUDA device"
                          f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1}).")
    return torch.device("cuda", i)
