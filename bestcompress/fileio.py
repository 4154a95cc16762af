"""File I/O that every layer may use (a leaf: imports only errors and torch).

- `atomic_write`/`atomic_save`: a temporary file in the destination's folder, fsynced, then renamed onto the
  destination, so a crash never leaves a half-written file. SIGTERM/SIGINT during the write remove the temporary
  file; temporary files left by a `kill -9` (our `.NAME.XXXXXXXX.tmpSUFFIX` pattern, older than
  `STALE_AFTER_S`) are removed by the next write into that folder. A full disk is one sentence, not a traceback.
- `check_output_path`: before any work, the output's folder exists, is writable (probed with a real file), and
  the output is none of the command's inputs (same path, symlink, `./x`, hard link).
- `load_checkpoint_file`: a safe `torch.load` (weights_only unless the user trusts the file).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .errors import CheckpointError, short_reason

STALE_AFTER_S = 10 * 60  # a temporary file this old is no write in progress (fsync and rename take seconds)
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^/]*)?$")  # what tempfile.mkstemp gives atomic_write


# ------------------------------------------------------------------------------------------- output checks

def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def probe_writable(folder: str | os.PathLike, error: type[Exception] = CheckpointError) -> None:
    """Create and remove a temporary file in `folder`; raise `error` (one sentence) if the OS refuses."""
    folder = Path(folder)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".bestcompress-probe.", suffix=".tmp")
    except OSError as e:
        raise error(f"Cannot write into the folder '{folder}' ({e.strerror or short_reason(e)}); choose another "
                    "output location.") from None
    os.close(fd)
    os.unlink(name)


def check_output_path(path: str | os.PathLike, error: type[Exception] = CheckpointError, *,
                      inputs: Iterable[str | os.PathLike | None] = (), probe: bool = False,
                      folder_ok: bool = False) -> Path:
    """`path` as a Path, after checking it can be written without destroying an input.

    Args:
        path: the output file (or folder, with `folder_ok`).
        error: the BestcompressError subclass to raise.
        inputs: every file the command reads; the output may not be (or resolve to, or be a hard link of) any.
        probe: also create and remove a file in the output's folder (a read-only folder fails now, not after
            an hour of training).
        folder_ok: the output is a folder (FINN export), so an existing folder is fine.
    Raises:
        `error` with one sentence otherwise.
    """
    path = Path(path)
    folder = _folder_of(path)
    for item in inputs:
        if item is not None and _same_file(path, Path(item)):
            raise error(f"The output '{path}' is the input '{item}'; give another output path so the input is "
                        "kept.")
    if not folder.is_dir():
        raise error(f"Cannot write '{path}': the folder '{folder}' does not exist.")
    if path.is_dir() and not folder_ok:
        raise error(f"Cannot write '{path}': it is a folder, give a file name.")
    if probe:
        probe_writable(folder, error)
    return path


# ------------------------------------------------------------------------------------------- atomic writes

def clean_stale_temps(folder: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove temporary files that an interrupted atomic_write left in `folder` (only our name pattern, and only
    files older than `older_than_s`, so a write in progress elsewhere is never touched). Returns what went."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _TEMP_RE.match(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


class _Interrupted(BaseException):
    """SIGTERM arrived during a write (raised so the temporary file is removed, then the process exits 143)."""


class _remove_on_sigterm:
    """While active, a SIGTERM raises `_Interrupted`, so `atomic_write` removes its temporary file before the
    process ends. Only where SIGTERM has its default action (it would kill the process on the spot) and only in
    the main thread; a handler someone installed is left alone. SIGINT already raises KeyboardInterrupt."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    self.old = signal.signal(signal.SIGTERM, self._raise)
            except (ValueError, OSError):  # pragma: no cover (not the main interpreter)
                self.old = None
        return self

    @staticmethod
    def _raise(signum, frame):
        raise _Interrupted(signum)

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Write a file so that a crash never leaves a half-written `path`.

    Args:
        path: the destination; its folder must exist.
        write_fn: called with a temporary path in the same folder (same suffix); it writes the file there.
    Returns:
        `path` as a Path, after the temporary file was fsynced and renamed onto it.
    Raises:
        CheckpointError: the folder cannot be written or the disk is full (the temporary file is removed).
    """
    path = check_output_path(path)
    folder = path.parent
    clean_stale_temps(folder)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise CheckpointError(f"Cannot write into the folder '{folder}' ({e.strerror or short_reason(e)}).") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _remove_on_sigterm():
            write_fn(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it a new file's permissions
            os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"Writing '{path}' failed ({e.strerror or short_reason(e)}); check the free disk "
                              "space and the folder's permissions.") from None
    except _Interrupted as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(128 + e.args[0]) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _torch_save(obj, tmp: Path, path: Path) -> None:
    try:
        torch.save(obj, tmp)
    except RuntimeError as e:  # torch's zip writer reports a full disk as RuntimeError ("file write failed")
        if "write" not in str(e).lower() and "space" not in str(e).lower():
            raise
        raise OSError(short_reason(e, 120)) from None


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)` through `atomic_write` (a full disk is a CheckpointError, no partial file)."""
    path = Path(path)
    return atomic_write(path, lambda tmp: _torch_save(obj, tmp, path))


# ------------------------------------------------------------------------------------------------ reading

# Harmless non-tensor objects common in training checkpoints (timm saves `args` as a Namespace).
_SAFE_GLOBALS: list = [argparse.Namespace]
try:
    import numpy as _np
    _SAFE_GLOBALS += [_np.dtype, _np.ndarray, type(_np.dtype("float32")), type(_np.dtype("float64")),
                      type(_np.dtype("int64"))]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    _SAFE_GLOBALS += [_reconstruct, scalar]
except ImportError:  # pragma: no cover
    pass


def _sniff(path: Path, head: bytes) -> None:
    """Raise a CheckpointError when `path` is clearly not a readable torch file."""
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"Checkpoint file '{path}' is truncated or corrupted (its zip archive is "
                                  "incomplete); save or download it again.")
        return
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # a pickle (legacy torch format)
        return
    try:
        head.decode("utf-8")
        text = True
    except UnicodeDecodeError:
        text = False
    what = "a text file" if text else "an unknown binary format"
    raise CheckpointError(f"'{path}' is not a PyTorch checkpoint (it looks like {what}); give a file written "
                          "by torch.save.")


# How torch's weights_only unpickler says it refused to import or call something (a damaged file says otherwise).
_UNSAFE_PATTERNS = (re.compile(r"Unsupported global: GLOBAL (\S+)"),
                    re.compile(r"unsupported GLOBAL (\S+)"),
                    re.compile(r"unrecognized function (\S+)"),
                    re.compile(r"Unsupported class (\S+)"))


def _pickled_code(msg: str) -> str | None:
    """What the weights_only unpickler refused (a global it would have imported), or None for a damaged file."""
    for pattern in _UNSAFE_PATTERNS:
        m = pattern.search(msg)
        if m:
            return m.group(1).rstrip(".,")
    return None


def load_checkpoint_file(path: str | os.PathLike, trust: bool = False):
    """Read a torch checkpoint safely (on the CPU).

    Args:
        path: a file written by torch.save.
        trust: allow arbitrary pickled objects (a whole nn.Module). Unpickling can run code: only for trusted files.
    Returns:
        The loaded object.
    Raises:
        CheckpointError: missing, empty, truncated or non-torch file, or pickled code without `trust`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint file '{path}' does not exist.")
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint file '{path}' is empty.")
    with open(path, "rb") as f:
        head = f.read(64)
    _sniff(path, head)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/... for bad files
        unsafe = None if trust else _pickled_code(str(e))
        if unsafe is not None:
            what = f" ({unsafe})" if unsafe else ""
            raise CheckpointError(
                f"Checkpoint '{path}' holds pickled Python code{what} that would run when loaded, so bestcompress "
                "did not load it; pass --trust-checkpoint (trust=True in Python) only if you trust where the file "
                "came from.") from None
        raise CheckpointError(f"Checkpoint file '{path}' could not be read; it is truncated or corrupted "
                              f"({type(e).__name__}: {short_reason(e)}).") from None
