"""The bestcompress format and state_dict extraction, and the loaders on top of them (safe reads, model building)."""
from __future__ import annotations

import argparse
import os

import pytest
import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.checkpoint import extract_state_dict, save_binary, save_fp
from bestcompress.fileio import atomic_save, atomic_write, load_checkpoint_file
from bestcompress.loading import load, load_binary, load_model
from bestcompress.errors import CheckpointError, ModelError
from bestcompress.zoo import create_model

SMALL = dict(embed_dims=32, depths=1, num_heads=2, num_classes=7, img_size=16, T=2)


def small_model(**kw):
    torch.manual_seed(0)
    return create_model("spikformer_cifar", **{**SMALL, **kw})


def one_line(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.endswith(".")
    return msg


FACTORY = '''
import torch
from torch import nn

def build(width=8, fail=False):
    if fail:
        raise ValueError("width is wrong")
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))

def not_a_model():
    return 42
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    return path


# ------------------------------------------------------------------------------------------- atomic writes

def test_atomic_save_writes_and_leaves_no_temp_file(tmp_path):
    out = atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert torch.equal(torch.load(out, weights_only=True)["a"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["x.pt"]


def test_atomic_write_failure_removes_temp_and_keeps_old_file(tmp_path):
    target = tmp_path / "x.pt"
    target.write_bytes(b"old")

    def crash(tmp):
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert sorted(os.listdir(tmp_path)) == ["x.pt"]
    assert target.read_bytes() == b"old"


def test_atomic_write_into_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        atomic_save({}, tmp_path / "nope" / "x.pt")
    one_line(e.value)


# ----------------------------------------------------------------------------------------------- loading

def test_load_errors_are_one_sentence(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "missing.pt", "does not exist")
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.pt", "is empty")
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp_path / "trunc.pt", "truncated or corrupted")
    (tmp_path / "notes.pt").write_text("epoch 3, accuracy 91 %\n")
    cases["text"] = (tmp_path / "notes.pt", "not a PyTorch checkpoint .*text file")
    (tmp_path / "random.pt").write_bytes(bytes(range(7, 200)))
    cases["random"] = (tmp_path / "random.pt", "not a PyTorch checkpoint")
    for name, (path, pattern) in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_checkpoint_file(path)
        assert str(path) in one_line(e.value), name


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Linear(3, 3)), path)
    with pytest.raises(CheckpointError, match="pickled .*--trust-checkpoint") as e:
        load_checkpoint_file(path)
    one_line(e.value)
    assert isinstance(load_checkpoint_file(path, trust=True), nn.Sequential)


def test_training_metadata_loads_without_trust(tmp_path):
    path = tmp_path / "timm.pt"
    import numpy as np

    torch.save({"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=0.1), "epoch": 3,
                "best_acc": np.float64(91.5), "curve": np.ones(3)}, path)
    obj = load_checkpoint_file(path)
    assert obj["epoch"] == 3 and obj["args"].lr == 0.1 and obj["best_acc"] == 91.5


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd, "optimizer": {}},
    lambda sd: {"net": sd},
    lambda sd: {"state_dict_ema": sd},
    lambda sd: {"model_ema": sd, "epoch": 1},
    lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
    lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()},
])
def test_extract_state_dict_layouts(wrap):
    sd = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    out = extract_state_dict(wrap(sd))
    assert set(out) == set(sd)


def test_extract_state_dict_prefers_non_ema_and_rejects_junk():
    sd, ema = {"w": torch.ones(1)}, {"w": torch.zeros(1)}
    assert extract_state_dict({"state_dict_ema": ema, "state_dict": sd})["w"].item() == 1.0
    with pytest.raises(CheckpointError, match="holds no state_dict .*epoch"):
        extract_state_dict({"epoch": 3, "acc": 0.5})


# ------------------------------------------------------------------------------------------ building models

def test_load_model_arch_reads_sizes_from_checkpoint(tmp_path):
    src = small_model()
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, path)
    m = load_model(path, arch="spikformer_cifar", model_kwargs={"img_size": 16, "T": 2})
    assert m.bc_spec["arch"] == "spikformer_cifar"
    assert m.bc_spec["kwargs"]["num_classes"] == 7 and m.bc_spec["kwargs"]["embed_dims"] == 32
    assert not m.training
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(m(x), src.eval()(x))


def test_load_model_autodetects_with_ddp_prefix(tmp_path):
    src = small_model()
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    m = load_model(path)
    assert m.bc_spec["arch"] == "spikformer_cifar" and m.bc_spec["kwargs"]["depths"] == 1


def test_load_model_unknown_architecture(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"fc.weight": torch.ones(3, 3)}, path)
    with pytest.raises(CheckpointError, match="no known architecture.*--arch.*--model") as e:
        load_model(path)
    one_line(e.value)


def test_load_model_shape_mismatch_names_key_and_shapes(tmp_path):
    sd = small_model().state_dict()
    sd["block.0.mlp.fc2_linear.weight"] = torch.zeros(32, 5)
    path = tmp_path / "ck.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"block\.0\.mlp\.fc2_linear\.weight.*\[32, 5\].*\[32, 128\]") as e:
        load_model(path, arch="spikformer_cifar")
    one_line(e.value)


def test_load_model_wrong_arch_names_missing_key_and_hint(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save(create_model("spikformer_imagenet", embed_dims=32, depths=1, num_heads=2, num_classes=5).state_dict(),
               path)
    with pytest.raises(CheckpointError, match="does not fit model 'spikformer_cifar'.*spikformer_imagenet"):
        load_model(path, arch="spikformer_cifar")


def test_load_model_unknown_arch():
    with pytest.raises(ModelError, match="Unknown model 'resnet'"):
        load_model(arch="resnet")


def test_factory_models(tmp_path, factory_file):
    m = load_model(model=f"{factory_file}:build", model_kwargs={"width": 6})
    assert m.bc_spec == {"factory": f"{factory_file.resolve()}:build", "kwargs": {"width": 6}}
    path = tmp_path / "ck.pt"
    torch.save({"model": m.state_dict()}, path)
    again = load_model(path, model=f"{factory_file}:build", model_kwargs={"width": 6})
    assert torch.equal(again[0].weight, m[0].weight)
    with pytest.raises(CheckpointError, match=r"'0.weight' has shape \[6, 4\] in the checkpoint but \[8, 4\]"):
        load_model(path, model=f"{factory_file}:build")
    bad = {f"{tmp_path}/nope.py:build": "does not exist", f"{factory_file}:missing": "has no function 'missing'",
           f"{factory_file}:not_a_model": "not a torch nn.Module", "no_such_pkg_xyz:fn": "Cannot import",
           "just_a_name": "expects FILE.py:FUNCTION"}
    for spec, pattern in bad.items():
        with pytest.raises(ModelError, match=pattern) as e:
            load_model(model=spec)
        one_line(e.value)
    with pytest.raises(ModelError, match="raised ValueError: width is wrong"):
        load_model(model=f"{factory_file}:build", model_kwargs={"fail": True})


def test_pickled_module_gets_pickle_spec(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Linear(3, 3)), path)
    m = load_model(path, trust=True)
    assert m.bc_spec == {"pickle": str(path.resolve())}


# ------------------------------------------------------------------------------------ the bestcompress format

def test_fp_roundtrip(tmp_path):
    src = small_model()
    path = save_fp(src, tmp_path / "fp.pt", extra={"epoch": 4})
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "bestcompress" and obj["kind"] == "fp" and obj["input_shape"] == [3, 16, 16]
    loaded = load(path)
    kind, m, info = loaded.kind, loaded.model, loaded.info
    assert kind == "fp" and info["extra"] == {"epoch": 4} and info["input_shape"] == (3, 16, 16)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(m(x), src.eval()(x))
    with pytest.raises(CheckpointError, match="full-precision bestcompress checkpoint, not a binary one"):
        load_binary(path)


def test_binary_roundtrip_gives_identical_outputs(tmp_path):
    src = small_model().eval()
    result = binarize(src)
    model = result.model
    with torch.no_grad():  # make the saved weights differ from a fresh binarize (as after training)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_binary(model, src, tmp_path / "bin.pt", extra={"note": "trained"})
    obj = torch.load(path, weights_only=True)
    assert obj["kind"] == "binary" and obj["recipe"]["name"] == "bestformer"
    assert set(obj["source_state_dict"]) == set(src.state_dict())
    binary, source, info = load_binary(path)
    assert info["recipe"] == result.recipe and info["extra"] == {"note": "trained"}
    x = torch.rand(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(binary(x), model(x))
        assert torch.equal(source(x), src(x))
    loaded = load(path)
    assert loaded.kind == "binary" and loaded.is_binary
    teacher = load_model(path, allow_binary=True)  # a binary checkpoint's source model is its teacher
    with torch.no_grad():
        assert torch.equal(teacher(x), src(x))
        assert torch.equal(loaded.source(x), src(x))
    with pytest.raises(CheckpointError, match="already a binary"):
        load_model(path)


def test_load_binary_rejects_other_files(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="not a bestcompress checkpoint"):
        load_binary(path)


def test_binarize_runs_passes_on_fake_input_and_falls_back(monkeypatch):
    import bestcompress.convert as bz
    from torch._subclasses.fake_tensor import FakeTensor

    src = small_model().eval()
    calls = []
    real = bz._binarize_once

    def spy(model, recipe, example_input):
        calls.append(isinstance(example_input, FakeTensor))
        return real(model, recipe, example_input)

    monkeypatch.setattr(bz, "_binarize_once", spy)
    x = torch.rand(2, 3, 16, 16)
    small = bz.binarize(src).model.eval()
    assert calls == [False]  # a small model: the real example is cheaper than FakeTensor dispatch
    calls.clear()
    monkeypatch.setattr(bz, "FAKE_MIN_WORK", 0)  # as if the model were large
    fast = bz.binarize(src).model.eval()
    assert calls == [True]  # shapes came from a FakeTensor: no real forward was needed
    calls.clear()
    monkeypatch.setattr(bz, "holds_fake", lambda model: True)  # as if a pass had kept fake state
    slow = bz.binarize(src).model.eval()
    assert calls == [True, False]
    with torch.no_grad():
        assert torch.equal(fast(x), slow(x)) and torch.equal(small(x), fast(x))


def test_load_binary_rejects_a_different_structure(tmp_path):
    src = small_model().eval()
    path = save_binary(binarize(src).model, src, tmp_path / "bin.pt")
    obj = torch.load(path, weights_only=True)
    obj["structure"] = obj["structure"][:-1]  # as if another version's passes had built another model
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="different model structure"):
        load_binary(path)


def test_structure_names_compute_only_subclasses_as_their_parent(tmp_path):
    from bestcompress.nn.fast_norm import ChannelLastBatchNorm1d
    from bestcompress.zoo import create_model
    torch.manual_seed(0)
    src = create_model("spikformer_seq", seq_len=16, in_channels=1, num_classes=4, embed_dims=16, num_heads=2,
                       mlp_ratios=2, depths=1, T=2).eval()
    model = binarize(src).model
    fast = [n for n, m in model.named_modules() if isinstance(m, ChannelLastBatchNorm1d)]
    assert fast  # binarize installed the fast token BatchNorm
    path = save_binary(model, src, tmp_path / "bin.pt")
    structure = torch.load(path, weights_only=True)["structure"]
    assert all(not e.split(":")[1].startswith("ChannelLast") for e in structure)
    assert f"{fast[0]}:BatchNorm1d" in structure  # as a checkpoint saved before the fast BatchNorm reads
    binary, _, _ = load_binary(path)
    x = torch.randn(3, 1, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(binary.eval()(x), model(x))
