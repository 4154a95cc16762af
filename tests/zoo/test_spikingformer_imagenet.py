"""Spikingformer with the ImageNet tokenizer (imagenet/model.py): public checkpoint names, /16 patch splitting,
detection, and the family acceptance path (binarize with its recipe and with bestformer, MACs, one distillation
step, verified exports)."""
from __future__ import annotations

import pytest
import torch

from bestcompress.errors import ModelError
from bestcompress.nn.reversible import ReversibleCoupling
from bestcompress.zoo import create_model, detect_architecture, tiny_model
from tests.zoo.family_checks import binarize_and_check_macs, distill_one_step, exports_verified, spikes_fired
from tests.zoo.test_models import build, example, matmul_shapes

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
IMAGENET = dict(tokenizer="imagenet", img_size=32, patch_size=16, attn_order="kv_first")


def public_keys(depths: int) -> list[str]:
    """state_dict names in the order imagenet/model.py registers them: the tokenizer's proj_conv/proj_bn and
    proj{1..4}_conv/_bn (its LIFs and max-pools hold none), then the blocks (never-called LayerNorms norm1/norm2,
    attention q/k/v/proj conv+BN, MLP mlp1/mlp2 conv+BN), then the head."""
    keys = ["patch_embed.proj_conv.weight"] + [f"patch_embed.proj_bn.{b}" for b in BN]
    for i in range(1, 5):
        keys += [f"patch_embed.proj{i}_conv.weight"] + [f"patch_embed.proj{i}_bn.{b}" for b in BN]
    for j in range(depths):
        p = f"block.{j}."
        keys += [f"{p}norm1.weight", f"{p}norm1.bias"]
        for n in "qkv":
            keys += [f"{p}attn.{n}_conv.weight"] + [f"{p}attn.{n}_bn.{b}" for b in BN]
        keys += [f"{p}attn.proj_conv.weight", f"{p}attn.proj_conv.bias"] + [f"{p}attn.proj_bn.{b}" for b in BN]
        keys += [f"{p}norm2.weight", f"{p}norm2.bias"]
        for n in ("mlp1", "mlp2"):
            keys += [f"{p}mlp.{n}_conv.weight", f"{p}mlp.{n}_conv.bias"] + [f"{p}mlp.{n}_bn.{b}" for b in BN]
    return keys + ["head.weight", "head.bias"]


def test_state_dict_names_are_the_public_ones_and_load_strictly():
    model = build("spikingformer", **IMAGENET)
    assert list(model.state_dict()) == public_keys(model.bc_spec["kwargs"]["depths"])
    other = build("spikingformer", seed=1, **IMAGENET)
    x = example(model)
    with torch.no_grad():
        assert not torch.equal(model(x), other(x))
        other.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(model(x), other(x))
    arch, cfg = detect_architecture(model.state_dict())
    assert arch == "spikingformer" and cfg["tokenizer"] == "imagenet" and cfg["attn_order"] == "kv_first"
    assert detect_architecture(build("spikingformer").state_dict())[1].get("tokenizer", "cifar") == "cifar"


def test_imagenet_tokenizer_splits_into_16_pixel_patches():
    with torch.device("meta"):
        model = create_model("spikingformer", tokenizer="imagenet", img_size=224, patch_size=16, embed_dims=512,
                             depths=8, num_classes=1000)
    assert model.num_patches == 196
    assert abs(sum(p.numel() for p in model.parameters()) - 29.68e6) / 29.68e6 < 0.01  # Spikingformer-8-512
    tiny = build("spikingformer", **IMAGENET)
    with torch.no_grad():
        tokens = tiny.patch_embed(example(tiny).unsqueeze(0).repeat(tiny.T, 1, 1, 1, 1))
    assert tokens.shape[2:] == (tiny.embed_dims, 2, 2) and tiny.num_patches == 4
    d = tiny.embed_dims // tiny.bc_spec["kwargs"]["num_heads"]
    assert matmul_shapes(tiny)[0][2][-2:] == (d, d)  # kᵀ·v first, as the ImageNet code


@pytest.mark.parametrize("kwargs", [dict(tokenizer="imagenet"), dict(tokenizer="imagenet", patch_size=16, img_size=24),
                                    dict(tokenizer="vit")])
def test_tokenizer_options_are_checked(kwargs):
    with pytest.raises(ModelError):
        tiny_model("spikingformer", **kwargs)


def test_family_recipe_binarizes_with_macs_kept():
    torch.manual_seed(0)
    model = build("spikingformer", **IMAGENET)
    result = binarize_and_check_macs(model, "spikingformer", example(model))
    assert any("kv->kv" in n for n in result.notes)


def test_bestformer_distills_and_exports(tmp_path):
    model = build("spikingformer", **IMAGENET)
    x = example(model)
    result = binarize_and_check_macs(model, "bestformer", x)
    assert any(isinstance(m, ReversibleCoupling) for m in result.model.modules())
    distill_one_step(result.model, model)
    assert spikes_fired(result.model, x) > 0.01
    exports_verified(result.model, x, tmp_path)
