"""One C++ source in nn/csrc compiled on first use, once per process: the build the single-file kernels share
(fast_norm.py's column sums, coupling_kernel.py's coupling, int_forward.py's spike converter; lif_kernel.py builds
one variant per instruction set and keeps its own).

`compiled_once` loads the source with torch.utils.cpp_extension (g++ and ninja; cached per machine under
TORCH_EXTENSIONS_DIR) and remembers the module, or None, in the caller's own cache dict (tests reset or replace
that dict to force a path). None means the kernel is switched off by its environment variable, cannot be built
(no compiler / headers), or lacks what `requires` checks; callers then run their torch fallback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

CSRC = Path(__file__).resolve().parent / "csrc"


def compiled_once(cache: dict, key: str, name: str, source: str, switch: str, off: tuple[str, ...] = ("torch",),
                  flags: tuple[str, ...] = ("-O3",), requires: Callable[[], object] | None = None):
    """The module built from csrc/`source` as `name` (cached under cache[key]), or None (module docstring)."""
    if key not in cache:
        mod = None
        if os.environ.get(switch, "auto").strip().lower() not in off:
            try:
                if requires is not None:
                    requires()
                from torch.utils.cpp_extension import load
                mod = load(name=name, sources=[str(CSRC / source)], verbose=False, extra_cflags=list(flags))
            except Exception:  # noqa: BLE001 - no compiler / headers / prerequisite: the caller's torch path
                mod = None
        cache[key] = mod
    return cache[key]
