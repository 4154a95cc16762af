"""The public API: the README's Python blocks run as written, every public name is what it says, `bc.load`
returns the right kind of model for every file kind, and no public function is shadowed by a module."""
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import bestcompress as bc
from bestcompress.nn.binary import BinaryConv1d, BinaryConv2d, BinaryLinear

BinaryLayer = (BinaryConv1d, BinaryConv2d, BinaryLinear)

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_python_block():
    assert readme_python_blocks()


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_block_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_blocks()[index], f"README block {index}", "exec"), {})


@pytest.mark.parametrize("name", bc.__all__)
def test_every_public_name_is_a_function_or_class(name):
    value = getattr(bc, name)
    assert callable(value) and not isinstance(value, type(bc)), f"bc.{name} is {value!r}"


def test_no_public_function_shares_its_name_with_a_module():
    # Only the package's own children can shadow an attribute of `bestcompress` (importing bestcompress.X sets it).
    modules = {m.name for m in pkgutil.iter_modules(bc.__path__)}
    assert {"convert", "training", "exporters"} <= modules
    assert not set(bc.__all__) & modules


def test_a_submodule_import_does_not_shadow_the_function():
    importlib.import_module("bestcompress.training.trainer")
    importlib.import_module("bestcompress.exporters.packed")
    assert bc.distill.__module__ == "bestcompress.training.trainer"
    assert bc.export.__module__ == "bestcompress.exporters"


def _tiny_fp():
    torch.manual_seed(0)
    return bc.create_model("spikformer_seq", num_classes=4, seq_len=20, embed_dims=32, num_heads=2, depths=1, T=2)


def test_load_returns_each_file_kind(tmp_path):
    fp = _tiny_fp().eval()
    bc.save_fp(fp, tmp_path / "fp.pt")
    result = bc.binarize(fp, "bestformer")
    bc.save_binary(result.model, fp, tmp_path / "bin.pt")
    bc.export(result.model, "packed", tmp_path / "bin.bcz")

    x = torch.rand(3, 1, 20)
    got_fp = bc.load(tmp_path / "fp.pt")
    assert got_fp.kind == "fp" and not got_fp.is_binary and got_fp.source is None
    assert not any(isinstance(m, BinaryLayer) for m in got_fp.model.modules())
    assert torch.equal(got_fp.model(x), fp(x))

    result.model.eval()
    for name, kind in (("bin.pt", "binary"), ("bin.bcz", "packed")):
        got = bc.load(tmp_path / name)
        assert got.kind == kind and got.is_binary
        assert any(isinstance(m, BinaryLayer) for m in got.model.modules())
        assert torch.allclose(got.model(x)[0], result.model(x)[0], atol=1e-6)
    assert bc.load(tmp_path / "bin.pt").source is not None
