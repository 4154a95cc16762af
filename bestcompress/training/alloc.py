"""Large freed CPU blocks kept for reuse while training (glibc malloc), instead of fresh zero-filled pages.

glibc serves a block at or above its mmap threshold (dynamic, at most 32 MiB) with a fresh mapping and unmaps it on
free, so each large activation or gradient of a training step arrives as new pages that the kernel zero-fills on
first touch. In a binary Spikformer step (dims 128, T=4, batch 64) that was ~190,000 page faults per step, about
a tenth of its CPU time. `reuse_freed_memory()` raises M_MMAP_THRESHOLD (and M_TRIM_THRESHOLD, so the heap's top is
not handed back after every step) to 1 GiB: such blocks then come from the heap and are reused. The price is that
memory freed below that size stays with the process (its peak, which every step reaches again anyway).

Process-wide and not undone; the trainer calls it for CPU runs. `BESTCOMPRESS_MALLOC=default` leaves malloc as it
is; elsewhere than glibc (musl, macOS, Windows) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
LIMIT = 1 << 30
_done: list[str] = []


def reuse_freed_memory() -> str:
    """Set glibc's thresholds once (module docstring); returns what was done, in words."""
    if _done:
        return _done[0]
    if os.environ.get("BESTCOMPRESS_MALLOC", "").strip().lower() == "default":
        why = "left as it is (BESTCOMPRESS_MALLOC=default)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        why = "left as it is (not glibc)"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, LIMIT) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 * LIMIT) == 1
        except (OSError, AttributeError):
            ok = False
        why = ("glibc M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB: large freed blocks are reused" if ok
               else "left as it is (mallopt refused)")
    _done.append(why)
    return why
