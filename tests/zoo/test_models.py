"""The model zoo: every registered model builds, runs, traces, round-trips and is recognised from its weights."""
from __future__ import annotations

import dataclasses
import operator

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from bestcompress.errors import ModelError
from bestcompress.nn.lif import LIF
from bestcompress.zoo import create_model, detect_architecture, get_entry, list_models, tiny_model

MODELS = list_models()


class LIFLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, LIF) or super().is_leaf_module(m, qualname)


def trace(model: torch.nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, LIFLeafTracer().trace(model))


def example(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *model.input_shape, generator=g) * 2


def build(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """Tiny model in eval mode with BatchNorm statistics calibrated on one batch.

    A fresh model's BN stats (mean 0, var 1) after std-0.02 convs fire no spikes in eval mode, which would make
    every output equal to the head bias and every check below vacuous.
    """
    torch.manual_seed(seed)
    model = tiny_model(name, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives exactly its statistics
            if m.affine:  # a positive shift: zero-mean streams (strided convs, no max-pool) average to silence
                torch.nn.init.constant_(m.bias, 0.25)
    with torch.no_grad():
        model.train()(example(model, batch=8, seed=99))
    return model.eval()


def matmul_shapes(model: torch.nn.Module) -> list[tuple[tuple, tuple, tuple]]:
    """(lhs, rhs, out) shapes of every `@` in the traced graph, in order."""
    gm = trace(model)
    ShapeProp(gm).propagate(example(model))
    return [(tuple(n.args[0].meta["tensor_meta"].shape), tuple(n.args[1].meta["tensor_meta"].shape),
             tuple(n.meta["tensor_meta"].shape))
            for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.matmul, torch.matmul)]


def test_registry_lists_the_five_models():
    assert set(MODELS) >= {"spikformer_cifar", "spikformer_imagenet", "spikingformer", "sdt_v1", "spikformer_seq"}


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_finite_and_input_dependent(name):
    model = build(name)
    entry = get_entry(name)
    assert model.input_shape == entry.input_shape(model.bc_spec["kwargs"])
    assert model.T == model.bc_spec["kwargs"]["T"]
    with torch.no_grad():
        y1 = model(example(model, seed=1))
        y2 = model(example(model, seed=2))
    assert y1.shape == (2, model.bc_spec["kwargs"]["num_classes"])
    assert torch.isfinite(y1).all()
    assert not torch.equal(y1, y2)  # spikes actually flow


@pytest.mark.parametrize("name", MODELS)
def test_events_mode_takes_time_major_frames(name):
    model = build(name, input_mode="events")
    T = model.T
    assert model.input_shape[0] == T
    x = (example(model) > 1.0).float()  # [B, T, C, ...] binary frames
    with torch.no_grad():
        y = model(x)
        # constant frames over T equal the static model's repeat of one frame
        static = build(name)
        static.load_state_dict(model.state_dict())
        frame = x[:, 0]
        y_rep = model(frame.unsqueeze(1).expand(-1, T, *frame.shape[1:]))
        y_static = static(frame)
    assert y.shape == (2, model.num_classes)
    torch.testing.assert_close(y_rep, y_static)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_strict(name):
    src, dst = build(name, seed=0), build(name, seed=1)
    x = example(src)
    with torch.no_grad():
        assert not torch.equal(src(x), dst(x))
    dst.load_state_dict(src.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("name", MODELS)
def test_fx_trace_with_lif_leaves_reproduces_output(name):
    model = build(name)
    gm = trace(model)
    assert any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), LIF) for n in gm.graph.nodes)
    x = example(model)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_detect_architecture_recovers_name_and_sizes(name):
    overrides = dict(num_classes=7, in_channels=2, mlp_ratios=2, depths=2)
    model = build(name, **overrides)
    found = detect_architecture(model.state_dict())
    assert found is not None
    arch, cfg = found
    assert arch == name
    for key, value in overrides.items():
        assert cfg[key] == value, key
    assert cfg["embed_dims"] == model.embed_dims
    # the inferred options rebuild a model that takes the checkpoint strictly
    create_model(arch, **cfg).load_state_dict(model.state_dict(), strict=True)


def test_detect_architecture_reads_heads_where_a_weight_reveals_them():
    model = build("sdt_v1", num_heads=4)
    assert detect_architecture(model.state_dict())[1]["num_heads"] == 4


def test_detect_architecture_ignores_module_prefix_and_rejects_foreign_dicts():
    sd = build("spikingformer").state_dict()
    assert detect_architecture({f"module.{k}": v for k, v in sd.items()})[0] == "spikingformer"
    assert detect_architecture({"fc.weight": torch.zeros(3, 4)}) is None
    sd["head2.weight"] = sd["head.weight"].clone()  # e.g. a BESTformer checkpoint is not a plain Spikingformer
    assert detect_architecture(sd) is None


def test_spikformer_cifar_default_size_matches_the_paper():
    model = create_model("spikformer_cifar")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 9.315e6) / 9.315e6 < 0.01
    assert model.input_shape == (3, 32, 32) and model.T == 4 and model.num_patches == 64
    assert model.bc_spec == {"arch": "spikformer_cifar", "kwargs": {**get_entry("spikformer_cifar").default_cfg,
                                                                     "input_mode": "static"}}


def test_spikformer_imagenet_default_size_matches_the_paper():
    model = create_model("spikformer_imagenet")
    n = sum(p.numel() for p in model.parameters())
    assert 29.5e6 < n < 30.5e6
    assert model.input_shape == (3, 224, 224) and model.num_patches == 196


def test_spikformer_seq_default_is_small():
    model = create_model("spikformer_seq")
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert model.input_shape == (1, 40)


def test_cifar_attention_forms_the_n_by_n_map():
    model = build("spikformer_cifar")
    N, d = model.num_patches, model.embed_dims // model.bc_spec["kwargs"]["num_heads"]
    assert N != d
    shapes = matmul_shapes(model)
    assert len(shapes) == 2 * model.bc_spec["kwargs"]["depths"]
    qk, av = shapes[0], shapes[1]
    assert qk[2][-2:] == (N, N) and av[2][-2:] == (N, d)


def test_imagenet_attention_computes_kt_v_first():
    model = build("spikformer_imagenet")
    N, d = model.num_patches, model.embed_dims // model.bc_spec["kwargs"]["num_heads"]
    assert N != d
    kv, qkv = matmul_shapes(model)[:2]
    assert kv[0][-2:] == (d, N) and kv[2][-2:] == (d, d)
    assert qkv[2][-2:] == (N, d)


@pytest.mark.parametrize("order, first", [("qk_first", "NN"), ("kv_first", "dd")])
def test_spikingformer_attention_order_option(order, first):
    model = build("spikingformer", attn_order=order)
    N, d = model.num_patches, model.embed_dims // model.bc_spec["kwargs"]["num_heads"]
    out = matmul_shapes(model)[0][2][-2:]
    assert out == ((N, N) if first == "NN" else (d, d))
    other = build("spikingformer", attn_order="kv_first" if order == "qk_first" else "qk_first")
    other.load_state_dict(model.state_dict())
    x = example(model)
    with torch.no_grad():  # binary q, k, v: both orders give the same integers
        torch.testing.assert_close(model(x), other(x))


def test_sdt_attention_has_no_matmul():
    assert matmul_shapes(build("sdt_v1")) == []


def test_bc_spec_rebuilds_the_same_architecture():
    model = build("sdt_v1", pooling_stat="0101", num_classes=3)
    spec = model.bc_spec
    again = create_model(spec["arch"], **spec["kwargs"])
    again.load_state_dict(model.state_dict(), strict=True)
    assert spec["kwargs"]["pooling_stat"] == "0101"


def test_unknown_name_or_option_is_a_model_error():
    with pytest.raises(ModelError, match="known models are .*spikformer_cifar"):
        create_model("vit_base")
    with pytest.raises(ModelError, match="no option 'depth'"):
        create_model("spikformer_cifar", depth=2)
    with pytest.raises(ModelError):
        get_entry("nope")


@pytest.mark.parametrize("name, kwargs", [
    ("spikformer_cifar", dict(embed_dims=64, num_heads=3)),
    ("spikformer_cifar", dict(img_size=30)),
    ("spikformer_cifar", dict(patch_size=16)),
    ("spikformer_imagenet", dict(depths=0)),
    ("spikingformer", dict(attn_order="sideways")),
    ("sdt_v1", dict(pooling_stat="01")),
    ("spikformer_seq", dict(input_mode="video")),
])
def test_bad_option_values_are_model_errors(name, kwargs):
    with pytest.raises(ModelError):
        tiny_model(name, **kwargs)


def test_entries_are_frozen_and_complete():
    for name in MODELS:
        entry = get_entry(name)
        assert entry.name == name and entry.family and entry.detect is not None
        with pytest.raises(dataclasses.FrozenInstanceError):
            entry.name = "other"
        with pytest.raises(TypeError):
            entry.default_cfg["T"] = 8


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_the_first_layer(name):
    model = build(name).train()
    y = model(example(model))
    # cross-entropy, as a trainer uses: its gradient does not vanish when a silent head gives all-zero logits
    torch.nn.functional.cross_entropy(y, torch.arange(y.shape[0]) % y.shape[1]).backward()
    first = next(p for p in model.parameters() if p.dim() > 1)  # the stem is registered first in every model
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_no_layernorm_or_softmax(name):
    model = build(name)
    assert not any(isinstance(m, (torch.nn.LayerNorm, torch.nn.Softmax)) for m in model.modules())
    gm = trace(model)
    targets = {str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert not any("softmax" in t or "layer_norm" in t for t in targets)
