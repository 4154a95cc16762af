"""Spike-driven Transformer v2 (Meta-SpikeFormer): public checkpoint names, the BN-and-pad layer, stage shapes,
and the family acceptance path (binarize with its recipe and with bestformer, MACs, one distillation step,
verified exports)."""
from __future__ import annotations

import pytest
import torch

from bestcompress.errors import ModelError
from bestcompress.nn.reversible import ReversibleCoupling
from bestcompress.zoo import create_model, detect_architecture, tiny_model
from bestcompress.zoo.sdt_v2 import BNAndPadLayer, stage_depths
from tests.zoo.family_checks import binarize_and_check_macs, distill_one_step, exports_verified, spikes_fired
from tests.zoo.test_models import build, example, matmul_shapes

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn(p: str) -> list[str]:
    return [f"{p}.{b}" for b in BN]


def repconv(p: str) -> list[str]:
    """nn.Sequential(RepConv, BatchNorm2d): body = 1×1 conv, BNAndPadLayer(.bn), Sequential(dw 3×3, 1×1, BN)."""
    return ([f"{p}.0.body.0.weight"] + bn(f"{p}.0.body.1.bn") + [f"{p}.0.body.2.0.weight", f"{p}.0.body.2.1.weight"]
            + bn(f"{p}.0.body.2.2") + bn(f"{p}.1"))


def public_keys(depths: int, kd: bool = False) -> list[str]:
    """state_dict names in the order classification/models.py (Spiking_vit_MetaFormer) registers its modules."""
    def down(p):
        return [f"{p}.encode_conv.weight", f"{p}.encode_conv.bias"] + bn(f"{p}.encode_bn")

    def conv_block(p):
        sep = [f"{p}.Conv.pwconv1.weight"] + bn(f"{p}.Conv.bn1") + [f"{p}.Conv.dwconv.weight",
                                                                     f"{p}.Conv.pwconv2.weight"] + bn(f"{p}.Conv.bn2")
        return sep + [f"{p}.conv1.weight"] + bn(f"{p}.bn1") + [f"{p}.conv2.weight"] + bn(f"{p}.bn2")

    def ms_block(p):
        attn = [k for n in ("q_conv", "k_conv", "v_conv", "proj_conv") for k in repconv(f"{p}.attn.{n}")]
        mlp = [f"{p}.mlp.fc1_conv.weight", f"{p}.mlp.fc1_conv.bias"] + bn(f"{p}.mlp.fc1_bn") + \
            [f"{p}.mlp.fc2_conv.weight", f"{p}.mlp.fc2_conv.bias"] + bn(f"{p}.mlp.fc2_bn")
        return attn + mlp

    n3, n4 = stage_depths(depths)
    keys = down("downsample1_1") + conv_block("ConvBlock1_1.0") + down("downsample1_2") + conv_block("ConvBlock1_2.0")
    keys += down("downsample2") + conv_block("ConvBlock2_1.0") + conv_block("ConvBlock2_2.0") + down("downsample3")
    keys += [k for j in range(n3) for k in ms_block(f"block3.{j}")] + down("downsample4")
    keys += [k for j in range(n4) for k in ms_block(f"block4.{j}")] + ["head.weight", "head.bias"]
    return keys + (["head_kd.weight", "head_kd.bias"] if kd else [])


def test_public_split_of_blocks():
    assert stage_depths(8) == (6, 2) and stage_depths(1) == (0, 1) and stage_depths(2) == (1, 1)


@pytest.mark.parametrize("cfg", [{}, dict(depths=2, kd=True)], ids=["tiny", "block3_and_kd"])
def test_state_dict_names_are_the_public_ones_and_load_strictly(cfg):
    model = build("sdt_v2", **cfg)
    assert list(model.state_dict()) == public_keys(model.depths, model.kd)
    other = build("sdt_v2", seed=1, **cfg)
    x = example(model)
    with torch.no_grad():
        assert not torch.equal(model(x), other(x))
        other.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(model(x), other(x))
    arch, found = detect_architecture(model.state_dict())
    assert arch == "sdt_v2" and found["depths"] == model.depths and found["kd"] == model.kd


def test_default_is_the_public_8_512_size():
    with torch.device("meta"):
        model = create_model("sdt_v2")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 55.35e6) / 55.35e6 < 0.01  # metaspikformer_8_512: 55 M parameters
    assert model.input_shape == (3, 224, 224) and model.num_patches == 196
    assert list(model.state_dict()) == public_keys(8)


def test_bn_and_pad_border_holds_the_bn_value_of_zero():
    torch.manual_seed(0)
    layer = BNAndPadLayer(pad_pixels=1, num_features=3)
    with torch.no_grad():
        layer.bn.running_mean.uniform_(-1, 1), layer.bn.running_var.uniform_(0.5, 2)
        layer.bn.weight.uniform_(0.5, 2), layer.bn.bias.uniform_(-1, 1)
    layer.eval()
    x = torch.rand(2, 3, 4, 5)
    y = layer(x)
    assert y.shape == (2, 3, 6, 7)
    torch.testing.assert_close(y[:, :, 1:-1, 1:-1], layer.bn(x), rtol=0, atol=0)
    zero = layer.bn(torch.zeros(1, 3, 1, 1)).reshape(1, 3, 1)
    border = torch.cat([y[:, :, 0, :], y[:, :, -1, :], y[:, :, :, 0], y[:, :, :, -1]], dim=-1)
    torch.testing.assert_close(border, zero.expand_as(border), rtol=0, atol=1e-6)


def test_stages_and_the_kv_first_attention():
    model = build("sdt_v2", depths=2)
    shapes = {}
    names = ("downsample1_1", "downsample1_2", "downsample2", "downsample3", "downsample4")
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, out, n=n: shapes.__setitem__(n, out.shape[2:]))
             for n in names]
    with torch.no_grad():
        model(example(model))
    for h in hooks:
        h.remove()
    D = model.embed_dims
    assert [shapes[n] for n in names] == [(D // 8, 32, 32), (D // 4, 16, 16), (D // 2, 8, 8), (D, 4, 4),
                                          (5 * D // 4, 4, 4)]
    kv, qkv = matmul_shapes(model)[:2]
    assert kv[2][-2:] == (D, D) and qkv[2][-2:] == (model.num_patches, D)  # one head: d = D


def test_kd_head_gives_two_outputs_in_training_and_their_mean_in_eval():
    model = build("sdt_v2", kd=True)
    x = example(model)
    with torch.no_grad():
        head, head_kd = model.train()(x)
        assert head.shape == head_kd.shape == (2, model.num_classes) and not torch.equal(head, head_kd)
        seen = {}
        hooks = [getattr(model, n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out))
                 for n in ("head", "head_kd")]
        y = model.eval()(x)
        for h in hooks:
            h.remove()
    torch.testing.assert_close(y, (seen["head"] + seen["head_kd"]) / 2)


def test_bestformer_leaves_the_two_headed_kd_model_alone():
    torch.manual_seed(0)
    model = build("sdt_v2", kd=True)
    result = binarize_and_check_macs(model, "bestformer", example(model))
    assert not any(isinstance(m, ReversibleCoupling) for m in result.model.modules())
    assert any("already has two heads ('head', 'head_kd')" in n for n in result.notes)
    # traced in both branches: (head, head_kd) in training, trained as a pair by distill; their mean in eval
    assert any("its training outputs are two heads" in n for n in result.notes) and result.model.bc_two_heads
    x = example(model)
    student, seen = result.model, {}
    with torch.no_grad():
        head, head_kd = student.train()(x)
        assert head.shape == head_kd.shape == (2, model.num_classes)
        hooks = [student.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out))
                 for n in ("head", "head_kd")]
        y = student.eval()(x)
        for h in hooks:
            h.remove()
    torch.testing.assert_close(y, (seen["head"] + seen["head_kd"]) / 2)


@pytest.mark.parametrize("kwargs", [dict(embed_dims=36), dict(num_heads=16), dict(img_size=40),
                                    dict(kd="yes")])
def test_bad_options_are_model_errors(kwargs):
    with pytest.raises(ModelError):
        tiny_model("sdt_v2", **kwargs)


def test_family_recipe_binarizes_with_macs_kept():
    torch.manual_seed(0)
    model = tiny_model("sdt_v2").eval()
    result = binarize_and_check_macs(model, "sdt_v2", example(model))
    assert any("block4.0.attn:kv->kv" in n for n in result.notes)
    assert result.model.get_submodule("ConvBlock1_2.0.Conv.dwconv").groups > 1  # depthwise, binarized too


@pytest.fixture(scope="module")
def bestformer():
    torch.manual_seed(0)
    model = build("sdt_v2")
    x = example(model)
    return model, x, binarize_and_check_macs(model, "bestformer", x)


def test_bestformer_couples_conv_and_transformer_stages(bestformer):
    model, x, result = bestformer
    stages = sorted({m.stage for m in result.model.modules() if isinstance(m, ReversibleCoupling)})
    assert stages == [0, 1, 2, 3]  # ConvBlock1_1, ConvBlock1_2, ConvBlock2_*, block4
    assert any("(block4.0.attn, block4.0.mlp)" in n for n in result.notes)


def test_bestformer_student_distills_one_step(bestformer):
    model, x, result = bestformer
    distill_one_step(result.model, model)
    assert spikes_fired(result.model, x) > 0.01


def test_bestformer_student_exports_verified(bestformer, tmp_path):
    model, x, result = bestformer
    exports_verified(result.model, x, tmp_path)
