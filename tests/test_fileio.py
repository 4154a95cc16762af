"""fileio: atomic writes survive crashes, signals and full disks; output checks protect the inputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bestcompress.errors import CheckpointError, ModelError
from bestcompress.fileio import (
    STALE_AFTER_S, atomic_save, atomic_write, check_output_path, clean_stale_temps, probe_writable,
)


def one_sentence(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


# ------------------------------------------------------------------------------------------- output checks

@pytest.mark.parametrize("how", ["same", "dot", "symlink", "hardlink", "absolute"])
def test_output_that_is_an_input_is_refused(tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "in.pt"
    src.write_bytes(b"weights")
    out = {"same": "in.pt", "dot": "./in.pt", "absolute": str(src), "symlink": "link.pt", "hardlink": "hard.pt"}[how]
    if how == "symlink":
        os.symlink("in.pt", "link.pt")
    if how == "hardlink":
        os.link("in.pt", "hard.pt")
    with pytest.raises(ModelError, match="is the input") as e:
        check_output_path(out, ModelError, inputs=["in.pt", None])
    one_sentence(e.value)
    assert src.read_bytes() == b"weights"
    assert check_output_path("other.pt", ModelError, inputs=["in.pt"]).name == "other.pt"


def test_read_only_folder_is_found_before_work():
    with pytest.raises(CheckpointError, match="Cannot write into the folder '/sys'") as e:
        check_output_path("/sys/out.pt", probe=True)
    one_sentence(e.value)
    with pytest.raises(ModelError, match="Permission denied"):
        probe_writable("/sys", ModelError)


def test_probe_leaves_nothing(tmp_path):
    probe_writable(tmp_path)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------- atomic writes

def test_full_disk_runtime_error_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError ('file write failed'), not OSError."""
    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="file write failed.*free disk space") as e:
        atomic_save({"a": 1}, tmp_path / "x.pt")
    one_sentence(e.value)
    assert os.listdir(tmp_path) == []


def test_other_runtime_errors_of_torch_save_are_not_disguised(tmp_path, monkeypatch):
    def bug(obj, f, *a, **k):
        raise RuntimeError("cannot pickle this object")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"a": 1}, tmp_path / "x.pt")
    assert os.listdir(tmp_path) == []


def test_os_error_during_write_is_one_sentence(tmp_path):
    def enospc(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device") as e:
        atomic_write(tmp_path / "x.bin", enospc)
    one_sentence(e.value)
    assert os.listdir(tmp_path) == []


def _temp(folder, name, age_s):
    p = folder / name
    p.write_bytes(b"left over")
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_stale_temp_files_are_cleaned_on_the_next_write(tmp_path):
    old = _temp(tmp_path, ".bin.ab12cd_9.tmp.pt", STALE_AFTER_S + 60)  # a kill -9 left it
    old_folder_format = _temp(tmp_path, ".finn_dir.x1y2z3w4.tmp", STALE_AFTER_S + 60)
    fresh = _temp(tmp_path, ".bin.zz99yy88.tmp.pt", 5)  # another write in progress: kept
    user = _temp(tmp_path, ".bin.tmp.pt", STALE_AFTER_S + 60)  # not our pattern: kept
    user2 = _temp(tmp_path, "notes.ab12cd34.tmp.pt", STALE_AFTER_S + 60)  # not hidden: kept
    atomic_save({"a": torch.ones(1)}, tmp_path / "out.pt")
    assert not old.exists() and not old_folder_format.exists()
    assert fresh.exists() and user.exists() and user2.exists()
    assert (tmp_path / "out.pt").exists()
    assert clean_stale_temps(tmp_path, older_than_s=0) == [fresh]


SIGTERM_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from bestcompress.fileio import atomic_write

    def slow(tmp):
        tmp.write_bytes(b"partial")
        Path(sys.argv[2]).write_text(str(tmp))  # tell the parent where the temporary file is
        time.sleep(60)

    atomic_write(Path(sys.argv[1]), slow)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_save_removes_the_temp_file(tmp_path, sig):
    script = tmp_path / "writer.py"
    script.write_text(SIGTERM_SCRIPT)
    out, where = tmp_path / "data" / "out.pt", tmp_path / "where.txt"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(where)], env=env,
                            stderr=subprocess.PIPE)
    for _ in range(600):
        if where.exists() and where.read_text():
            break
        time.sleep(0.05)
    tmp = where.read_text()
    assert os.path.exists(tmp)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert not os.path.exists(tmp) and os.listdir(out.parent) == []
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM  # still ends as SIGTERM asked
