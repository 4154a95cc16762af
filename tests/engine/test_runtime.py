"""The engine on the tiny zoo models: spike-exact with PyTorch on both kernel backends; load, memory, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bestcompress import engine as E
from bestcompress.convert import binarize
from bestcompress.engine.layers import PackedConv, PackedLinear
from bestcompress.errors import CheckpointError, DataError
from bestcompress.exporters.packed import save_packed
from bestcompress.nn.binary import is_binary_layer
from bestcompress.nn.calibrate import make_it_fire
from bestcompress.zoo import tiny_model

FAMILIES = ["spikformer_cifar", "spikformer_seq", "spikingformer", "sdt_v1"]
BACKENDS = ["numpy"] + (["compiled"] if E.compiled_available() else [])
_cache: dict = {}


def firing_binary(name: str, quantizer: str = "sign"):
    """The tiny zoo model binarized with the BESTformer recipe, BatchNorms calibrated so that it fires."""
    key = (name, quantizer)
    if key not in _cache:
        torch.manual_seed(0)
        model = binarize(tiny_model(name), "bestformer", overrides={"weights.quantizer": quantizer}).model
        _cache[key] = make_it_fire(model, model.bc_input_shape, batches=2)
    return _cache[key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_engine_is_spike_exact_on_the_zoo(name, backend):
    model = firing_binary(name)
    engine = E.from_model(model)
    assert engine.plan.packed and not engine.plan.kept
    assert not any(is_binary_layer(m) for m in engine.model.modules())
    with E.use_backend(backend):
        report = E.verify(engine, model, samples=4, batch=2)
    assert report.passed, report.message()
    assert report.flipped == 0 and report.max_abs_diff <= 1e-4 and report.spikes > 0
    assert report.packed_calls > 0 and report.float_calls == 0  # every binary layer ran on popcounts
    # not vacuous: the neurons fire, and not everywhere
    x = torch.rand((2,) + engine.input_shape, generator=torch.Generator().manual_seed(0))
    rates = []
    hooks = [m.register_forward_hook(lambda mod, a, o: rates.append(float(o.mean())))
             for n, m in engine.model.named_modules() if type(m).__name__ == "LIF"]
    engine(x)
    for h in hooks:
        h.remove()
    assert 0.01 < float(np.mean(rates)) < 0.9


def test_attention_matmuls_run_on_popcounts():
    engine = E.from_model(firing_binary("spikformer_cifar"))
    assert engine.plan.matmuls == 4
    engine.reset_stats()
    engine(np.random.default_rng(0).random((1,) + engine.input_shape, dtype=np.float32))
    assert engine.stats()["matmul"] == {"packed": 4, "float": 0}


def test_scaled_quantizer_matches_within_tolerance():
    model = firing_binary("spikformer_seq", quantizer="sign_scaled")
    engine = E.from_model(model)
    assert any(m.alpha is not None for m in engine.packed_layers().values())
    report = E.verify(engine, model, samples=4)
    assert report.max_abs_diff <= 1e-4, report.message()


def test_input_that_does_not_pack_takes_the_float_path_and_still_equals_pytorch():
    model = firing_binary("spikformer_seq")
    name, layer = next((n, m) for n, m in model.named_modules() if is_binary_layer(m) and hasattr(m, "in_features"))
    packed = PackedLinear(layer)
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))  # negative, not dyadic
    with torch.no_grad():
        assert torch.equal(packed(x), layer(x))
    assert packed.stats == {"packed": 0, "float": 1}


def test_conv_layer_equals_pytorch_on_spikes_and_on_floats():
    model = firing_binary("spikformer_cifar")
    layer = model.get_submodule("patch_embed.proj_conv1")
    conv = PackedConv(layer)
    g = torch.Generator().manual_seed(2)
    spikes = (torch.rand((3, layer.in_channels, 8, 8), generator=g) < 0.3).to(torch.float32)
    with torch.no_grad():
        assert torch.equal(conv(spikes), layer(spikes))
        noisy = spikes - 0.3
        assert torch.equal(conv(noisy), layer(noisy))
    assert conv.stats == {"packed": 1, "float": 1}


def test_load_a_packed_file_memory_is_the_packed_size(tmp_path):
    model = firing_binary("spikformer_cifar")
    path = save_packed(model, tmp_path / "m.bcz")
    engine = E.load(path)
    x = torch.rand((3,) + engine.input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(engine(x), model(x), atol=1e-4, rtol=0)
    assert E.verify(path).passed
    mem = engine.memory()
    bits = sum(m.weight.numel() for m in model.modules() if is_binary_layer(m))
    assert mem["sign_bit_bytes"] == (bits + 7) // 8
    # the words hold the sign bits, padded to 64-bit words per channel group: never more than 2x here
    assert mem["sign_bit_bytes"] <= mem["packed_weight_bytes"] <= 2 * mem["sign_bit_bytes"] + 4096
    assert mem["activation_bytes"] > 0
    # no float copy of a binary weight is kept: the packed layers hold words, α and bias only
    assert all(not list(m.parameters()) for m in engine.packed_layers().values())
    assert all(m.weight_words.dtype == torch.int64 for m in engine.packed_layers().values())


def test_bad_inputs_are_one_sentence_errors(tmp_path):
    engine = E.from_model(firing_binary("spikformer_seq"))
    with pytest.raises(DataError, match="shape"):
        engine(torch.zeros(2, 3, 3))
    with pytest.raises(DataError, match="NumPy array or a torch tensor"):
        engine([1, 2, 3])
    not_packed = tmp_path / "x.bcz"
    not_packed.write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="not a packed"):
        E.load(not_packed)


def test_single_sample_without_batch_axis_is_accepted():
    engine = E.from_model(firing_binary("spikformer_seq"))
    x = torch.rand(engine.input_shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(engine(x), engine(x.unsqueeze(0)))
