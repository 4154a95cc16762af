"""Lets a subpackage that shares its name with an API function be called as that function.

`bestcompress.distill` and `bestcompress.export` are both subpackages and the spine's functions (DESIGN.md):
importing a subpackage sets the package attribute to the module, so the module itself forwards calls.
"""
from __future__ import annotations

import importlib
import sys
import types


def make_callable(module_name: str, target: str) -> None:
    """Calling module `module_name` calls `target` ('pkg.mod:function', imported on first call)."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            mod, _, fn = target.partition(":")
            return getattr(importlib.import_module(mod), fn)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
