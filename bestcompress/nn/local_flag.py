"""A thread-local setting changed for the duration of a `with` block and restored after it (nested blocks see
their own value; other threads are not affected)."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def setting(local, name: str, value):
    """Within the block, `getattr(local, name)` is `value`; afterwards what it was (None if it was unset)."""
    outer = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, outer)
