"""File I/O that every layer may use: atomic writes and output-path checks (a leaf: imports only errors and torch).

Every file bestcompress writes goes through `atomic_write`: a temporary file in the destination's folder, fsynced,
then renamed onto the destination, so a crash never leaves a half-written file.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import CheckpointError


def check_output_path(path: str | os.PathLike, error: type[Exception] = CheckpointError) -> Path:
    """`path` as a Path, after checking that its folder exists and that it is not itself a folder.

    Raises:
        `error` (a BestcompressError subclass) with one sentence otherwise.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise error(f"Cannot write '{path}': the folder '{folder}' does not exist.")
    if path.is_dir():
        raise error(f"Cannot write '{path}': it is a folder, give a file name.")
    return path


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Write a file so that a crash never leaves a half-written `path`.

    Args:
        path: the destination; its folder must exist.
        write_fn: called with a temporary path in the same folder (same suffix); it writes the file there.
    Returns:
        `path` as a Path, after the temporary file was fsynced and renamed onto it.
    """
    path = check_output_path(path)
    folder = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise CheckpointError(f"Cannot write into '{folder}': {e.strerror or e}.") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it a new file's permissions
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"Writing '{path}' failed: {e.strerror or e}.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)` through `atomic_write`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
