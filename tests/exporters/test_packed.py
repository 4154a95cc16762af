"""The packed .bcz artifact: 1 bit per binary weight, reloads bit-exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bestcompress.errors import CheckpointError
from bestcompress.exporters import export_model
from bestcompress.exporters.packed import fp32_bytes, is_packed, load_packed, read_header, save_packed
from bestcompress.exporters import verify_file
from bestcompress.nn.binary import is_binary_layer
from bestcompress.nn.calibrate import make_it_fire

from .conftest import tiny_binary


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().view(torch.int32)


def _assert_same(model, loaded):
    layers = {n: m for n, m in model.named_modules() if is_binary_layer(m)}
    other = {n: m for n, m in loaded.named_modules() if is_binary_layer(m)}
    assert layers and set(layers) == set(other)
    for name, layer in layers.items():
        assert torch.equal(_bits(layer.binary_weight()), _bits(other[name].binary_weight())), name
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2)
    for key, value in sd.items():
        if key[: -len(".weight")] not in layers:
            assert torch.equal(value, sd2[key]), key
    x = torch.rand((3,) + tuple(model.bc_input_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("quantizer", ["sign", "sign_scaled"])
def test_roundtrip_is_bit_exact(tmp_path, quantizer):
    model, _ = tiny_binary("spikformer_seq", **{"weights.quantizer": quantizer})
    with torch.no_grad():  # edge case: a constant channel standardizes to 0 (binary +1, or scale 0)
        model.get_submodule("block.0.mlp.fc1_linear").weight[3].fill_(0.25)
    path = save_packed(model, tmp_path / "m.bcz")
    assert is_packed(path)
    header = read_header(path)
    assert header["version"] == 1 and header["spec"]["arch"] == "spikformer_seq"
    assert header["recipe"]["weights"]["quantizer"] == quantizer
    raw = sum(info["raw_channels"] for info in header["binary"].values())
    channels = sum(info["shape"][0] for info in header["binary"].values())
    assert raw <= 0.05 * channels  # nearly every channel is stored as bits
    with np.load(path) as z:
        assert set(z.files) <= {"header", "blob_uint8", "blob_float32", "blob_int64"}
    for name, info in header["binary"].items():
        blob, _, shape = header["index"][f"bits/{name}"]
        assert blob == "blob_uint8" and shape == [(int(np.prod(info["shape"])) + 7) // 8]
    loaded = load_packed(path)
    _assert_same(model, loaded)
    assert path.stat().st_size < fp32_bytes(model)


def test_packed_export_is_verified_and_much_smaller(tmp_path):
    model, _ = tiny_binary("spikformer_seq", **{"reversible.enabled": False})
    wide = make_it_fire(model, model.bc_input_shape, batches=2)
    result = export_model(wide, "packed", tmp_path / "m.bcz")
    assert result.verification.passed and result.verification.weights_exact
    assert result.ratio > 3  # tiny model: the fp32 tokenizer conv and head weigh a lot here
    report = verify_file(tmp_path / "m.bcz", wide)
    assert report.passed and report.weights_exact and report.max_abs_diff == 0.0
    other, _ = tiny_binary("spikformer_seq", **{"reversible.enabled": False})
    with torch.no_grad():
        other.get_submodule("block.0.attn.q_linear").weight.mul_(-1)
    bad = verify_file(tmp_path / "m.bcz", other)
    assert not bad.passed and bad.weights_exact is False and "q_linear" in bad.message()


def test_truncated_or_foreign_file(tmp_path):
    model, _ = tiny_binary("spikformer_seq", **{"reversible.enabled": False})
    path = save_packed(model, tmp_path / "m.bcz")
    data = path.read_bytes()
    (tmp_path / "cut.bcz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_packed(tmp_path / "cut.bcz")
    (tmp_path / "text.bcz").write_text("hello")
    with pytest.raises(CheckpointError, match="not a packed"):
        load_packed(tmp_path / "text.bcz")


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


def test_bit_flips_and_truncations_are_one_sentence_or_harmless(tmp_path):
    """Real corruptions: a byte flipped at several offsets (member payloads, the central directory), and cuts."""
    model, _ = tiny_binary("spikformer_seq", **{"reversible.enabled": False})
    path = save_packed(model, tmp_path / "m.bcz")
    data = path.read_bytes()
    x = torch.rand((2,) + tuple(model.bc_input_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    cases = {f"flip@{f}": _flip(data, int(f * len(data))) for f in (0.05, 0.3, 0.5, 0.7, 0.9)}
    cases["flip@central-directory"] = _flip(data, len(data) - 40)
    cases.update({f"cut@{f}": data[: int(f * len(data))] for f in (0.1, 0.5, 0.9, 0.999)})
    errors = 0
    for name, damaged in cases.items():
        bad = tmp_path / f"{name}.bcz"
        bad.write_bytes(damaged)
        try:
            loaded = load_packed(bad)
        except CheckpointError as e:
            msg = str(e)
            assert "truncated or corrupted" in msg or "incomplete header" in msg, (name, msg)
            assert msg.count(". ") == 0 and "\n" not in msg, (name, msg)
            errors += 1
            continue
        with torch.no_grad():  # a byte nobody reads (a timestamp): the model must still be the same
            assert torch.equal(loaded(x), want), name
    assert errors >= len(cases) - 2
