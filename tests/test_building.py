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


def test_a_model_file_imports_its_sibling_modules_as_a_script_would(tmp_path):
    # Public code (BESTformer's cifar/model.py) does `from quantized_utils import IRConv2d` next to itself.
    import sys

    from bestcompress.building import build_from_factory
    from bestcompress.errors import ModelError

    (tmp_path / "bin_layers_sibling.py").write_text(
        "import torch.nn.functional as F\nfrom torch import nn\n\n"
        "class SignConv2d(nn.Conv2d):\n"
        "    def forward(self, x):\n"
        "        return F.conv2d(x, self.weight.sign(), self.bias, self.stride, self.padding)\n")
    (tmp_path / "net.py").write_text(
        "from torch import nn\nfrom bin_layers_sibling import SignConv2d\n\n"
        "def build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), SignConv2d(4, 4, 1))\n")
    before = list(sys.path)
    try:
        model = build_from_factory(f"{tmp_path / 'net.py'}:build")
        assert type(model[1]).__name__ == "SignConv2d"
        assert model(torch.rand(1, 3, 6, 6)).shape == (1, 4, 4, 4)
        assert sys.path == before  # the folder is searched while importing only
        (tmp_path / "broken.py").write_text("import no_such_sibling_here\n\ndef build():\n    return None\n")
        with pytest.raises(ModelError, match="no_such_sibling_here"):
            build_from_factory(f"{tmp_path / 'broken.py'}:build")
        assert sys.path == before
    finally:
        sys.modules.pop("bin_layers_sibling", None)


def test_a_model_file_inside_a_package_imports_relatively_as_its_repository_does(tmp_path):
    # A repository's models/ package (models/net.py: `from .parts.layers import ...`), the module's folder not
    # on any path; the package's __init__ files run, the user's sys.path and sys.modules are left as they were.
    import sys

    from bestcompress.building import build_from_factory
    from bestcompress.errors import ModelError

    pkg = tmp_path / "models"
    (pkg / "parts").mkdir(parents=True)
    (pkg / "__init__.py").write_text("LOADED = True\n")
    (pkg / "parts" / "__init__.py").write_text("")
    (pkg / "parts" / "layers.py").write_text(
        "from torch import nn\n\nclass Conv1x1(nn.Conv2d):\n"
        "    def __init__(self, cin, cout):\n        super().__init__(cin, cout, 1, bias=False)\n")
    (pkg / "net.py").write_text(
        "from torch import nn\nfrom .parts.layers import Conv1x1\nfrom . import LOADED\n\n"
        "def build(width=4):\n    assert LOADED\n    return nn.Sequential(Conv1x1(3, width), nn.ReLU())\n")
    before, mods = list(sys.path), set(sys.modules)
    model = build_from_factory(f"{pkg / 'net.py'}:build", {"width": 5})
    again = build_from_factory(f"{pkg / 'net.py'}:build")
    assert type(model[0]) is type(again[0]) and type(model[0]).__name__ == "Conv1x1"  # imported once
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(model(x), torch.relu(torch.nn.functional.conv2d(x, model[0].weight)))
    assert sys.path == before and "models" not in sys.modules
    assert {m for m in set(sys.modules) - mods if not m.startswith("bc_user_pkg_")} == set()
    (pkg / "broken.py").write_text("from .no_such_part import X\n\ndef build():\n    return None\n")
    with pytest.raises(ModelError, match="no_such_part"):
        build_from_factory(f"{pkg / 'broken.py'}:build")
    assert sys.path == before
