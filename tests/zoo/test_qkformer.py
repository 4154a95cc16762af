"""QKFormer: public checkpoint names (both public files), hierarchical shapes, attention kinds, and the family
acceptance path (binarize with its recipe and with bestformer, MACs, one distillation step, verified exports)."""
from __future__ import annotations

import pytest
import torch

from bestcompress.errors import ModelError
from bestcompress.nn.reversible import ReversibleCoupling
from bestcompress.zoo import detect_architecture, tiny_model
from tests.zoo.family_checks import binarize_and_check_macs, distill_one_step, exports_verified, spikes_fired
from tests.zoo.test_models import build, example, matmul_shapes, trace

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
IMAGENET_TINY = dict(layout="imagenet", img_size=32, patch_size=16, embed_dims=32, num_heads=2, depths=4)


def conv_bn(prefix: str, name: str, bias: bool = False) -> list[str]:
    return [f"{prefix}{name}_conv.weight"] + ([f"{prefix}{name}_conv.bias"] if bias else []) + \
        [f"{prefix}{name}_bn.{b}" for b in BN]


def public_keys(layout: str, depths: int) -> list[str]:
    """state_dict names in the order the public code registers its modules (cifar10/model.py: stages of 1, 1 and
    depths-2 blocks, stage-3 attention `ssa`, MLP `mlp1/mlp2`; imagenet/qkformer.py: 1, 2, depths-3, `attn`,
    `fc1/fc2`, a third stem conv `proj2`)."""
    imagenet = layout == "imagenet"
    mlp = "fc" if imagenet else "mlp"
    keys = conv_bn("patch_embed1.", "proj") + conv_bn("patch_embed1.", "proj1")
    keys += conv_bn("patch_embed1.", "proj2") if imagenet else []
    keys += conv_bn("patch_embed1.", "proj_res")
    for i in (2, 3):
        keys += [k for n in ("proj3", "proj4", "proj_res") for k in conv_bn(f"patch_embed{i}.", n)]
    blocks = [1, 2, depths - 3] if imagenet else [1, 1, depths - 2]
    for stage, count in enumerate(blocks, start=1):
        attn, qkv = ("tssa", "qk") if stage < 3 else ("attn" if imagenet else "ssa", "qkv")
        for j in range(count):
            p = f"stage{stage}.{j}."
            keys += [k for n in qkv for k in conv_bn(f"{p}{attn}.", n)] + conv_bn(f"{p}{attn}.", "proj", bias=True)
            keys += conv_bn(f"{p}mlp.", f"{mlp}1", bias=True) + conv_bn(f"{p}mlp.", f"{mlp}2", bias=True)
    return keys + ["head.weight", "head.bias"]


@pytest.mark.parametrize("cfg", [{}, IMAGENET_TINY], ids=["cifar", "imagenet"])
def test_state_dict_names_are_the_public_ones_and_load_strictly(cfg):
    model = build("qkformer", **cfg)
    layout, depths = model.bc_spec["kwargs"]["layout"], model.depths
    assert list(model.state_dict()) == public_keys(layout, depths)
    other = build("qkformer", seed=1, **cfg)
    x = example(model)
    with torch.no_grad():
        assert not torch.equal(model(x), other(x))
        other.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(model(x), other(x))
    arch, found = detect_architecture(model.state_dict())
    assert arch == "qkformer" and found["layout"] == layout and found["depths"] == depths


def test_stages_halve_the_resolution_and_double_the_width():
    model = build("qkformer")  # cifar layout: 16 px, stem keeps 16x16, then 8x8 and 4x4
    shapes = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, out, n=n: shapes.__setitem__(n, out.shape[2:]))
             for n in ("patch_embed1", "patch_embed2", "patch_embed3")]
    with torch.no_grad():
        model(example(model))
    for h in hooks:
        h.remove()
    D = model.embed_dims
    assert shapes == {"patch_embed1": (D // 4, 16, 16), "patch_embed2": (D // 2, 8, 8), "patch_embed3": (D, 4, 4)}
    assert model.num_patches == 16
    assert build("qkformer", **IMAGENET_TINY).num_patches == 4  # the ImageNet stem: /16 overall


def test_token_attention_has_no_matmul_and_stage3_forms_kt_v_first():
    model = build("qkformer")
    d = model.embed_dims // model.bc_spec["kwargs"]["num_heads"]
    shapes = matmul_shapes(model)  # stages 1 and 2 (token attention) add none
    assert len(shapes) == 2 * len(model.stage3)
    kv, qkv = shapes[:2]
    assert kv[2][-2:] == (d, d) and qkv[2][-2:] == (model.num_patches, d)
    gm = trace(model)
    masks = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("tssa.attn_lif")]
    assert masks == ["stage1.0.tssa.attn_lif", "stage2.0.tssa.attn_lif"]  # the binary token masks


def test_bad_layout_heads_or_depths_are_model_errors():
    with pytest.raises(ModelError, match="layout"):
        tiny_model("qkformer", layout="video")
    with pytest.raises(ModelError, match="divide the stage-1 width"):
        tiny_model("qkformer", embed_dims=48, num_heads=8)
    with pytest.raises(ModelError, match="depths"):
        tiny_model("qkformer", **{**IMAGENET_TINY, "depths": 2})


def test_family_recipe_binarizes_with_macs_kept():
    torch.manual_seed(0)
    model = tiny_model("qkformer").eval()
    result = binarize_and_check_macs(model, "qkformer", example(model))
    assert any("stage3.0.ssa:kv->kv" in n for n in result.notes)


@pytest.fixture(scope="module")
def bestformer():
    """(fp model, input, bestformer result), calibrated so that the neurons fire."""
    torch.manual_seed(0)
    model = build("qkformer")
    x = example(model)
    return model, x, binarize_and_check_macs(model, "bestformer", x)


def test_bestformer_couples_stage_by_stage(bestformer):
    model, x, result = bestformer
    couplings = [m for m in result.model.modules() if isinstance(m, ReversibleCoupling)]
    assert sorted({m.stage for m in couplings}) == [0, 1, 2]  # one trunk per stage: stage1, stage2, stage3
    assert any("stage 2 ('stage3')" in n for n in result.notes)


def test_bestformer_student_distills_one_step(bestformer):
    model, x, result = bestformer
    distill_one_step(result.model, model)
    assert spikes_fired(result.model, x) > 0.01


def test_bestformer_student_exports_verified(bestformer, tmp_path):
    model, x, result = bestformer
    exports_verified(result.model, x, tmp_path)
