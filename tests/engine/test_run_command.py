"""`bestcompress run model.bcz --data ...` and the engine check in `bestcompress verify model.bcz`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bestcompress.convert import binarize
from bestcompress.data import load_dataset
from bestcompress.exporters.packed import save_packed
from bestcompress.nn.calibrate import make_it_fire
from bestcompress.zoo import create_model, get_entry

from tests.cli_helpers import assert_user_error, invoke


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A tiny Spikformer for 8×8 one-channel images (digits), binarized, firing, packed."""
    torch.manual_seed(0)
    cfg = dict(get_entry("spikformer_cifar").tiny_cfg, img_size=8, in_channels=1, num_classes=10)
    binary = binarize(create_model("spikformer_cifar", **cfg).eval(), "bestformer").model
    make_it_fire(binary, binary.bc_input_shape)
    path = save_packed(binary, tmp_path_factory.mktemp("engine") / "digits.bcz")
    return path, binary


def test_run_reports_the_pytorch_models_top1_and_latency(digits_model):
    path, binary = digits_model
    r = invoke("run", path, "--data", "digits", "--samples", "64", "--batch-size", "16", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    data = load_dataset("digits", binary)
    x, y = data.test.tensors
    with torch.no_grad():
        expected = float((binary(data.encoding(x[:64])).argmax(-1) == y[:64]).float().mean())
    assert out["samples"] == 64 and out["top1"] == pytest.approx(expected)
    assert out["latency_ms_batch1"] > 0 and out["memory"]["packed_weight_bytes"] > 0
    text = invoke("run", path, "--data", "digits", "--samples", "16")
    assert text.exit_code == 0 and "top-1" in text.output and "latency" in text.output, text.output


def test_run_on_an_npz_file(digits_model, tmp_path):
    path, binary = digits_model
    g = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x=g.random((12, 1, 8, 8), dtype=np.float32), y=g.integers(0, 10, 12))
    r = invoke("run", path, "--data", npz, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["samples"] > 0


def test_run_bad_input_is_one_sentence(digits_model, tmp_path):
    path, _ = digits_model
    assert_user_error(invoke("run", tmp_path / "missing.bcz", "--data", "digits"), "does not exist")
    other = tmp_path / "notes.bcz"
    other.write_text("not a model")
    assert_user_error(invoke("run", other, "--data", "digits"), "not a packed")
    assert_user_error(invoke("run", path, "--data", "mnist1d"), "shape")
    assert_user_error(invoke("run", path, "--data", tmp_path / "nope.npz"), "nope.npz")


def test_verify_a_packed_file_checks_the_engine(digits_model):
    path, _ = digits_model
    r = invoke("verify", path, "--against", path)
    assert r.exit_code == 0, r.output
    assert "1-bit engine" in r.output and "spike-exact" in r.output


def test_inspect_a_packed_file_shows_the_engine_memory(digits_model):
    path, binary = digits_model
    r = invoke("inspect", path)
    assert r.exit_code == 0 and "1-bit engine memory" in r.output, r.output
    mem = json.loads(invoke("inspect", path, "--json").output)["engine_memory"]
    bits = sum(m.weight.numel() for n, m in binary.named_modules() if hasattr(m, "binary_weight"))
    assert mem["sign_bit_bytes"] == (bits + 7) // 8 and mem["packed_weight_bytes"] >= mem["sign_bit_bytes"]
    assert mem["activation_bytes"] > 0
