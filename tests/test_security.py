"""No code from a file without consent (issue 7 item 1).

A checkpoint's or .bcz header's stored model spec names `subprocess:run` (shell=True), `os:system` or
`builtins:exec` with arguments that would create a marker file; a pickled checkpoint holds a __reduce__ that
would do the same. Through every command that reads a model: exit code 2, one sentence, and the marker never
appears. A positive control shows the marker does appear when the user opts in (so these tests can fail).
"""
from __future__ import annotations

import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from bestcompress.checkpoint import save_binary, save_fp
from bestcompress.convert import binarize
from bestcompress.errors import CheckpointError
from bestcompress.exporters.packed import save_packed
from bestcompress.loading import load
from bestcompress.zoo import tiny_model
from tests.cli_helpers import assert_user_error, invoke

ARCH = "spikformer_cifar"


def _specs(marker):
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "subprocess_run": {"factory": "subprocess:run",
                           "kwargs": {"args": f"{sys.executable} -c \"{code}\"", "shell": True}},
        "os_system": {"factory": "os:system", "kwargs": {"command": f"{sys.executable} -c \"{code}\""}},
        "builtins_exec": {"factory": "builtins:exec", "kwargs": {"source": code}},
    }


class Evil:
    """Pickles to a call that writes the marker when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class EvilSystem:
    """Pickles to os.system(...) writing the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"{sys.executable} -c \"open({self.marker!r}, 'w').write('pwned')\"",))


def _rewrite_spec(path, spec, out):
    obj = torch.load(path, weights_only=True)
    obj["spec"] = spec
    torch.save(obj, out)


def _rewrite_bcz(path, spec, out):
    with np.load(path, allow_pickle=False) as z:
        blobs = {k: z[k] for k in z.files}
    header = json.loads(bytes(blobs["header"]).decode())
    header["spec"] = spec
    blobs["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(out, "wb") as f:
        np.savez_compressed(f, **blobs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("security")
    marker = folder / "MARKER"
    torch.manual_seed(0)
    fp = tiny_model(ARCH).eval()
    good_fp = save_fp(fp, folder / "good_fp.pt")
    good_bin = save_binary(binarize(fp).model, fp, folder / "good_bin.pt")
    good_bcz = save_packed(load(good_bin).model, folder / "good.bcz")
    out = {"folder": folder, "marker": marker, "good_fp": good_fp, "good_bin": good_bin, "good_bcz": good_bcz}
    for name, spec in _specs(marker).items():
        _rewrite_spec(good_fp, spec, folder / f"{name}_fp.pt")
        _rewrite_spec(good_bin, spec, folder / f"{name}_bin.pt")
        _rewrite_bcz(good_bcz, spec, folder / f"{name}.bcz")
    torch.save({"state_dict": fp.state_dict(), "evil": Evil(marker)}, folder / "pickle_fp.pt")
    torch.save(Evil(marker), folder / "pickle_only.pt")
    with open(folder / "pickle_legacy.pt", "wb") as f:  # a plain (pre-zip) pickle file
        pickle.dump({"state_dict": fp.state_dict(), "x": EvilSystem(marker)}, f, protocol=2)
    pickle_spec = {"pickle": str(folder / "pickle_only.pt")}
    _rewrite_spec(good_fp, pickle_spec, folder / "pickle_spec_fp.pt")
    _rewrite_spec(good_bin, pickle_spec, folder / "pickle_spec_bin.pt")
    _rewrite_bcz(good_bcz, pickle_spec, folder / "pickle_spec.bcz")
    return out


def _commands(kind, path, f):
    """Every command that reads a model of this kind from `path`, as argument lists."""
    o = f["folder"]
    if kind == "fp":
        return [["binarize", path, "-o", o / "out_bin.pt"], ["inspect", path],
                ["evaluate", path, "--data", "synthetic", "--limit-batches", "1"],
                ["train", "--init", path, "--data", "synthetic", "--epochs", "1", "-o", o / "out_fp.pt",
                 "--run-dir", o / "run"],
                ["distill", f["good_bin"], "--teacher", path, "--data", "synthetic", "--epochs", "1",
                 "-o", o / "out_cie.pt", "--run-dir", o / "run"]]
    cmds = [["inspect", path], ["evaluate", path, "--data", "synthetic", "--limit-batches", "1"],
            ["export", path, "-f", "packed", "-o", o / "out.bcz"],
            ["verify", f["good_bcz"], "--against", path]]
    if kind == "binary":
        cmds.append(["distill", path, "--data", "synthetic", "--epochs", "1", "-o", o / "out_cie.pt",
                     "--run-dir", o / "run"])
    else:
        cmds.append(["verify", path, "--against", f["good_bin"]])
    return cmds


CASES = [(spec, kind, suffix) for spec in ("subprocess_run", "os_system", "builtins_exec", "pickle_spec")
         for kind, suffix in (("fp", "_fp.pt"), ("binary", "_bin.pt"), ("packed", ".bcz"))]


@pytest.mark.parametrize("spec,kind,suffix", CASES, ids=[f"{s}-{k}" for s, k, _ in CASES])
def test_a_spec_naming_code_is_refused_by_every_command(files, spec, kind, suffix):
    path = files["folder"] / f"{spec}{suffix}"
    for args in _commands(kind, path, files):
        result = invoke(*args)
        assert_user_error(result)
        assert not files["marker"].exists(), (args, result.output)
        line = result.output.strip()
        assert "--model" in line or "--teacher-model" in line, line  # says which option builds the model
        assert "--trust-checkpoint" in line, line
        if spec != "pickle_spec":
            assert _specs(files["marker"])[spec]["factory"] in line, line  # names the factory to pass


@pytest.mark.parametrize("name", ["pickle_fp.pt", "pickle_only.pt", "pickle_legacy.pt"])
def test_a_pickle_holding_code_is_called_pickled_code_not_corrupted(files, name):
    path = files["folder"] / name
    for args in _commands("fp", path, files):
        result = invoke(*args)
        assert_user_error(result, "pickled Python code", "--trust-checkpoint")
        assert "corrupted" not in result.output
        assert not files["marker"].exists()


def test_the_factory_named_on_the_command_line_builds_the_model(files, tmp_path):
    """A file naming a user factory says which one to pass; passing it works (the model is user code)."""
    factory = tmp_path / "mine.py"
    factory.write_text(f"from bestcompress.zoo import tiny_model\n\ndef build():\n    return tiny_model({ARCH!r})\n")
    spec = {"factory": f"{factory}:build", "kwargs": {}}
    src = tmp_path / "factory_bin.pt"
    _rewrite_spec(files["good_bin"], spec, src)
    with pytest.raises(CheckpointError, match=f"pass --model {factory}:build"):
        load(src)
    for args in (["inspect", src], ["export", src, "-f", "packed", "-o", tmp_path / "out.bcz"],
                 ["evaluate", src, "--data", "synthetic", "--limit-batches", "1"]):
        result = invoke(*args, "--model", f"{factory}:build")  # every command that names the option takes it
        assert result.exit_code == 0, result.output
    result = invoke("verify", files["good_bcz"], "--against", src, "--model", f"{factory}:build")
    assert result.exit_code == 0, result.output
    result = invoke("distill", src, "--model", f"{factory}:build", "--data", "synthetic", "--epochs", "1",
                    "--limit-batches", "1", "-o", tmp_path / "cie.pt", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load(src, model=f"{factory}:build").model(x), load(files["good_bin"]).model(x))


def test_positive_control_trust_does_run_the_named_code(files, tmp_path):
    """With --trust-checkpoint the file's factory is called: the marker appears. Proves the checks above can fail."""
    marker = tmp_path / "CONTROL"
    spec = _specs(marker)["subprocess_run"]
    path = tmp_path / "control_fp.pt"
    _rewrite_spec(files["good_fp"], spec, path)
    result = invoke("inspect", path, "--trust-checkpoint")
    assert marker.exists()
    assert result.exit_code == 2  # subprocess.run returns no model: refused after it ran
    os.unlink(marker)
