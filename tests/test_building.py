"""building.py: a stored spec builds a zoo model from plain data, and never imports or calls code without consent."""
from __future__ import annotations

import pytest
import torch

from bestcompress.building import build_from_spec, factory_file, factory_key
from bestcompress.convert import binarize
from bestcompress.errors import CheckpointError
from bestcompress.exporters.packed import save_packed
from bestcompress.loading import load
from bestcompress.zoo import tiny_model

FACTORY = "from bestcompress.zoo import tiny_model\n\ndef build(num_classes=10):\n" \
          "    return tiny_model('spikformer_cifar', num_classes=num_classes)\n"


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(FACTORY)
    return f"{path}:build"


def test_zoo_spec_builds_the_registered_model():
    ref = tiny_model("spikformer_cifar")
    model = build_from_spec(ref.bc_spec)
    assert type(model) is type(ref) and model.bc_spec == ref.bc_spec


@pytest.mark.parametrize("spec,needle", [
    ({"arch": "subprocess:run"}, "not a registered zoo model"),
    ({"arch": ["spikformer_cifar"]}, "not a registered zoo model"),
    ({"factory": "os:system", "kwargs": {"command": "true"}}, "pass --model os:system"),
    ({"pickle": "/tmp/model.pkl"}, "pickled module"),
    ({"nothing": 1}, "names no arch"),
    ("spikformer_cifar", "not a mapping"),
    ({"arch": "spikformer_cifar", "kwargs": {"T": object()}}, "plain data"),
])
def test_specs_that_are_refused(spec, needle):
    with pytest.raises(CheckpointError, match=needle) as e:
        build_from_spec(spec, source="Checkpoint 'x.pt'")
    assert "\n" not in str(e.value) and str(e.value).startswith("Checkpoint 'x.pt'")


def test_the_option_named_is_the_one_the_command_takes():
    with pytest.raises(CheckpointError, match="pass --teacher-model pkg.mod:fn"):
        build_from_spec({"factory": "pkg.mod:fn"}, option="--teacher-model")


def test_a_user_factory_builds_with_the_stored_kwargs_unless_given(factory):
    spec = {"factory": factory_key(factory), "kwargs": {"num_classes": 4}}
    assert build_from_spec(spec, factory=factory).head.out_features == 4
    assert build_from_spec(spec, factory=factory, factory_kwargs={"num_classes": 6}).head.out_features == 6
    assert build_from_spec(spec, trust=True).head.out_features == 4  # the file's factory, trusted
    zoo = build_from_spec({"arch": "spikformer_cifar", "kwargs": {"num_classes": 3}}, factory=factory)
    assert zoo.head.out_features == 10  # a zoo spec's kwargs are not the factory's


def test_factory_file_names_the_input():
    assert str(factory_file("dir/mine.py:build")) == "dir/mine.py"
    assert factory_file("pkg.mod:build") is None and factory_file(None) is None


def test_a_packed_artifact_from_user_code_needs_that_code_named(tmp_path, factory):
    from bestcompress.building import build_from_factory
    torch.manual_seed(0)
    source = build_from_factory(factory).eval()
    binary = binarize(source).model.eval()
    path = save_packed(binary, tmp_path / "mine.bcz")
    with pytest.raises(CheckpointError, match="pass --model .*mine.py:build"):
        load(path)
    loaded = load(path, model=factory)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert loaded.kind == "packed" and torch.equal(loaded.model(x), binary(x))
