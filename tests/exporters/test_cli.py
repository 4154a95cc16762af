"""`bestcompress export` and `bestcompress verify` through click's CliRunner."""
from __future__ import annotations

import os
import sys

import pytest
from click.testing import CliRunner

from bestcompress.checkpoint import save_binary
from bestcompress.cli import cli

from .conftest import tiny_binary
from tests.cli_helpers import assert_user_error, invoke


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    binary, source = tiny_binary("spikformer_seq")
    path = tmp_path_factory.mktemp("ckpt") / "bin.pt"
    save_binary(binary, source, path)
    return path


def test_export_and_verify(tmp_path, ckpt):
    out = tmp_path / "m.bcz"
    r = invoke("export", ckpt, "--format", "packed", "-o", out)
    assert r.exit_code == 0, r.output
    assert out.is_file() and "smaller than the fp32 weights" in r.output and "matches PyTorch" in r.output
    r = invoke("verify", out, "--against", ckpt)
    assert r.exit_code == 0 and "matches PyTorch" in r.output, r.output
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's permissions, not mkstemp's 0600
    packed = invoke("inspect", out, "--json")
    original = invoke("inspect", ckpt, "--json")
    assert packed.exit_code == 0 and original.exit_code == 0, packed.output + original.output
    import json
    p, o = json.loads(packed.output), json.loads(original.output)
    assert p["binary_mac_fraction"] == o["binary_mac_fraction"] > 0.5 and p["total_params"] == o["total_params"]
    onnx_out = tmp_path / "m.onnx"
    r = invoke("export", ckpt, "-f", "onnx", "-o", onnx_out, "--batch-size", "2")
    assert r.exit_code == 0 and onnx_out.is_file(), r.output
    r = invoke("verify", onnx_out, "--against", ckpt, "--samples", "2")
    assert r.exit_code == 0 and "onnxruntime" in r.output, r.output


def test_not_a_bestcompress_model(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("just some text")
    assert_user_error(invoke("export", bad, "-f", "qonnx", "-o", tmp_path / "m.onnx"), "notes.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pt"]


def test_unknown_format(tmp_path, ckpt):
    assert_user_error(invoke("export", ckpt, "-f", "tflite", "-o", tmp_path / "m.x"), "tflite", "qonnx")
    assert list(tmp_path.iterdir()) == []


def test_output_in_missing_folder(tmp_path, ckpt):
    assert_user_error(invoke("export", ckpt, "-f", "packed", "-o", tmp_path / "nope" / "m.bcz"), "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_finn_without_finn_plus(tmp_path, ckpt, monkeypatch):
    for name in [m for m in sys.modules if m == "finn" or m.startswith("finn.")] + ["finn"]:
        monkeypatch.setitem(sys.modules, name, None)
    r = invoke("export", ckpt, "-f", "finn", "-o", tmp_path / "finn_dir")
    assert_user_error(r, "FINN+", "pip install --no-deps finn-plus==1.6.1")
    assert list(tmp_path.iterdir()) == []


def test_verify_bad_inputs(tmp_path, ckpt):
    assert_user_error(invoke("verify", tmp_path / "missing.onnx", "--against", ckpt), "does not exist")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    assert_user_error(invoke("verify", junk, "--against", ckpt), "junk.onnx")


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory, ckpt):
    out = tmp_path_factory.mktemp("bcz") / "m.bcz"
    r = invoke("export", ckpt, "--format", "packed", "-o", out)
    assert r.exit_code == 0, r.output
    return out


def test_corrupt_bcz_is_one_sentence_everywhere(tmp_path, ckpt, packed_file):
    data = packed_file.read_bytes()
    flipped = tmp_path / "flipped.bcz"
    flipped.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:])
    cut = tmp_path / "cut.bcz"
    cut.write_bytes(data[: len(data) * 3 // 4])
    for bad in (flipped, cut):
        assert_user_error(invoke("inspect", bad), bad.name, "corrupted")
        assert_user_error(invoke("export", bad, "-f", "onnx", "-o", tmp_path / "o.onnx"), bad.name, "corrupted")
        assert_user_error(invoke("verify", bad, "--against", ckpt), bad.name, "corrupted")
        assert_user_error(invoke("verify", packed_file, "--against", bad), bad.name, "corrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.bcz", "flipped.bcz"]


def test_verify_packed_against_another_model(tmp_path, packed_file):
    other, source = tiny_binary("spikformer_seq", **{"reversible.enabled": False})
    path = tmp_path / "other.pt"
    save_binary(other, source, path)
    assert_user_error(invoke("verify", packed_file, "--against", path), "m.bcz")
    from bestcompress.errors import ExportError
    from bestcompress.exporters import verify_file
    with pytest.raises(ExportError, match="another model") as e:
        verify_file(packed_file, other)
    assert str(e.value).count(". ") == 0


def test_verify_refuses_unknown_domains(tmp_path, ckpt):
    import onnx

    out = tmp_path / "m.onnx"
    assert invoke("export", ckpt, "-f", "qonnx", "-o", out).exit_code == 0
    proto = onnx.load(str(out))
    next(n for n in proto.graph.node if n.op_type == "BipolarQuant").domain = "os"
    onnx.save(proto, str(out))
    assert_user_error(invoke("verify", out, "--against", ckpt), "custom-op domain 'os'")
