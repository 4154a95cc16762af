"""training/alloc.py: the malloc setting the trainer makes for CPU runs is done once, can be declined, and says
what it did."""
from __future__ import annotations

import platform

from bestcompress.training import alloc


def test_declined_by_the_environment(monkeypatch):
    monkeypatch.setattr(alloc, "_done", [])
    monkeypatch.setenv("BESTCOMPRESS_MALLOC", "default")
    assert alloc.reuse_freed_memory() == "left as it is (BESTCOMPRESS_MALLOC=default)"
    monkeypatch.delenv("BESTCOMPRESS_MALLOC")
    assert "BESTCOMPRESS_MALLOC" in alloc.reuse_freed_memory()  # once per process: the first answer stands


def test_set_once_on_glibc(monkeypatch):
    monkeypatch.setattr(alloc, "_done", [])
    monkeypatch.delenv("BESTCOMPRESS_MALLOC", raising=False)
    why = alloc.reuse_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert why.startswith("glibc M_MMAP_THRESHOLD 1 GiB")
    else:
        assert why == "left as it is (not glibc)"
    assert alloc._done == [why]
