"""Spike-driven Transformer v2, Meta-SpikeFormer (Yao et al., ICLR 2024): conv stages, then transformer stages.

Mirrors BICLab/Spike-Driven-Transformer-V2, classification/models.py (Spiking_vit_MetaFormer with BNAndPadLayer,
RepConv, SepConv, MS_ConvBlock, MS_MLP, MS_Attention_RepConv_qkv_id, MS_Block, MS_DownSampling): attribute
names, registration order and parameter shapes match that file, so its checkpoints load with strict=True.
Layout [T, B, C, H, W]; every conv reads spikes (a LIF precedes it) except the first.

With D = embed_dims the stage widths are D/8, D/4 (two conv stages at /2 and /4), D/2 (conv, /8), D and 5D/4
(transformer, /16; the public embed_dim lists [96, 192, 384, 480], [128, 256, 512, 640], [192, 384, 768, 960] are
D = 384, 512, 768). Each down-sampling is [LIF,] conv + BN. A conv block is x + SepConv(x) (inverted separable
conv, 7×7 depthwise), then + BN(conv3×3(LIF(BN(conv3×3(LIF(x)))))). A transformer block is x + attention(x), then
+ MLP(x); attention: s = LIF(x); q, k, v = LIF(BN(RepConv(s))); y = LIF_0.5(q (kᵀ v) · 0.125);
out = BN(RepConv(y)). RepConv is 1×1 conv, BN that pads with the BN value of zero, 3×3 depthwise, 1×1, BN.

Differences from the public file, none of which changes a parameter name or shape or (for mlp_ratios=4) a value:
- BNAndPadLayer writes its border with torch.where instead of slice assignment, so torch.fx traces it;
- the public forward hard-codes T=1 and the conv blocks' 4×C width; here T and mlp_ratios are options;
- the public model has block3 of 6 and block4 of 2 blocks (depths=8); here block4 gets max(1, depths // 4) of
  `depths` blocks and block3 the rest;
- the head is applied to the mean over T of the spikes (public: per step, then the mean; equal by linearity).
With kd=True the public distillation head `head_kd` exists: (head, head_kd) in training, their mean in eval.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bestcompress.errors import ModelError
from bestcompress.zoo._common import (
    check_image_size, check_input_mode, check_transformer_dims, count_blocks, guess_heads, image_input_shape,
    init_linear_trunc_normal, lif, mlp_ratio_from, shape_of, split_heads, split_tb3, split_tb4, time_first_image,
)
from bestcompress.zoo.registry import register_model

ARCH = "sdt_v2"
DOWNSAMPLE = 16


class BNAndPadLayer(nn.Module):
    """BatchNorm2d, then a border of `pad_pixels` holding the value the BN gives a zero input
    (bias − running_mean·weight/√(running_var + eps)), so the next unpadded conv sees a zero-padded BN input."""

    def __init__(self, pad_pixels: int, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.pad_pixels <= 0:
            return y
        p = [self.pad_pixels] * 4
        bn = self.bn
        value = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        inside = F.pad(torch.ones_like(y[:1, :1]), p)  # 1 inside, 0 on the border
        return torch.where(inside > 0, F.pad(y, p), value.view(1, -1, 1, 1))


class RepConv(nn.Module):
    """body = 1×1 conv, BNAndPad(1), [3×3 depthwise (no padding), 1×1 conv to out_channel, BN]; no biases."""

    def __init__(self, in_channel: int, out_channel: int) -> None:
        super().__init__()
        conv3x3 = nn.Sequential(nn.Conv2d(in_channel, in_channel, 3, 1, 0, groups=in_channel, bias=False),
                                nn.Conv2d(in_channel, out_channel, 1, 1, 0, bias=False),
                                nn.BatchNorm2d(out_channel))
        self.body = nn.Sequential(nn.Conv2d(in_channel, in_channel, 1, 1, 0, bias=False),
                                  BNAndPadLayer(pad_pixels=1, num_features=in_channel), conv3x3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SepConv(nn.Module):
    """Inverted separable conv (MobileNetV2): LIF, 1×1 conv to 2·dim, BN, LIF, 7×7 depthwise, 1×1 conv, BN."""

    def __init__(self, dim: int, expansion_ratio: int = 2, kernel_size: int = 7) -> None:
        super().__init__()
        med = int(expansion_ratio * dim)
        self.lif1 = lif()
        self.pwconv1 = nn.Conv2d(dim, med, kernel_size=1, stride=1, bias=False)
        self.bn1 = nn.BatchNorm2d(med)
        self.lif2 = lif()
        self.dwconv = nn.Conv2d(med, med, kernel_size=kernel_size, padding=kernel_size // 2, groups=med, bias=False)
        self.pwconv2 = nn.Conv2d(med, dim, kernel_size=1, stride=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = split_tb4(self.bn1(self.pwconv1(self.lif1(x).flatten(0, 1))), T, B)
        x = self.dwconv(self.lif2(x).flatten(0, 1))
        return split_tb4(self.bn2(self.pwconv2(x)), T, B)


class MS_ConvBlock(nn.Module):  # noqa: N801 - the public class name
    """x + Conv(x) (SepConv), then + BN(conv3×3(LIF(BN(conv3×3(LIF(x)))))), widths dim -> hidden -> dim."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.Conv = SepConv(dim=dim)  # noqa: N815 - the public attribute name
        self.lif1 = lif()
        self.conv1 = nn.Conv2d(dim, hidden, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.lif2 = lif()
        self.conv2 = nn.Conv2d(hidden, dim, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = self.Conv(x) + x
        y = split_tb4(self.bn1(self.conv1(self.lif1(x).flatten(0, 1))), T, B)
        y = split_tb4(self.bn2(self.conv2(self.lif2(y).flatten(0, 1))), T, B)
        return x + y


class MS_MLP(nn.Module):  # noqa: N801 - the public class name
    """BN(Conv1d(LIF(x))) dim -> hidden, then BN(Conv1d(LIF(·))) hidden -> dim, over the flattened tokens."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1_conv = nn.Conv1d(in_features, hidden_features, kernel_size=1, stride=1)
        self.fc1_bn = nn.BatchNorm1d(hidden_features)
        self.fc1_lif = lif()
        self.fc2_conv = nn.Conv1d(hidden_features, in_features, kernel_size=1, stride=1)
        self.fc2_bn = nn.BatchNorm1d(in_features)
        self.fc2_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = split_tb3(self.fc1_bn(self.fc1_conv(self.fc1_lif(x.flatten(3)).flatten(0, 1))), T, B)
        x = self.fc2_bn(self.fc2_conv(self.fc2_lif(x).flatten(0, 1)))
        return x.reshape(T, B, C, H, W)


class MS_Attention_RepConv_qkv_id(nn.Module):  # noqa: N801 - the public class name
    """s = LIF(x); q, k, v = LIF(BN(RepConv(s))); y = LIF_0.5(q (kᵀ v) · 0.125); out = BN(RepConv(y))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 0.125
        self.head_lif = lif()
        self.q_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))
        self.k_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))
        self.v_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))
        self.q_lif = lif()
        self.k_lif = lif()
        self.v_lif = lif()
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        s = self.head_lif(x).flatten(0, 1)
        h, d = self.num_heads, self.head_dim
        q = split_heads(self.q_lif(split_tb4(self.q_conv(s), T, B)).flatten(3), T, B, h, d)
        k = split_heads(self.k_lif(split_tb4(self.k_conv(s), T, B)).flatten(3), T, B, h, d)
        v = split_heads(self.v_lif(split_tb4(self.v_conv(s), T, B)).flatten(3), T, B, h, d)
        kv = k.transpose(-2, -1) @ v
        y = (q @ kv) * self.scale
        y = self.attn_lif(y.transpose(3, 4).reshape(T, B, C, -1)).reshape(T, B, C, H, W)
        return split_tb4(self.proj_conv(y.flatten(0, 1)), T, B)


class MS_Block(nn.Module):  # noqa: N801 - the public class name
    """x + attn(x), then + mlp(x)."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.attn = MS_Attention_RepConv_qkv_id(dim, num_heads)
        self.mlp = MS_MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class MS_DownSampling(nn.Module):  # noqa: N801 - the public class name
    """[LIF,] conv (with bias) + BN; the first one reads the image and has no LIF."""

    def __init__(self, in_channels: int, embed_dims: int, kernel_size: int = 3, stride: int = 2, padding: int = 1,
                 first_layer: bool = True) -> None:
        super().__init__()
        self.first_layer = first_layer
        self.encode_conv = nn.Conv2d(in_channels, embed_dims, kernel_size=kernel_size, stride=stride,
                                     padding=padding)
        self.encode_bn = nn.BatchNorm2d(embed_dims)
        if not first_layer:
            self.encode_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        if not self.first_layer:
            x = self.encode_lif(x)
        return split_tb4(self.encode_bn(self.encode_conv(x.flatten(0, 1))), T, B)


def stage_depths(depths: int) -> tuple[int, int]:
    """Blocks in block3 and block4: the public 8 are 6 + 2; block4 gets max(1, depths // 4) (1: block4 only)."""
    last = max(1, depths // 4)
    return depths - last, last


def detect(state_dict: Mapping) -> dict | None:
    first, width, last, hidden, head = (shape_of(state_dict, k) for k in (
        "downsample1_1.encode_conv.weight", "downsample3.encode_conv.weight", "downsample4.encode_conv.weight",
        "block4.0.mlp.fc1_conv.weight", "head.weight"))
    if None in (first, width, last, hidden, head) or shape_of(state_dict, "ConvBlock1_1.0.Conv.dwconv.weight") is None:
        return None
    d = width[0]
    return {"embed_dims": d, "depths": count_blocks(state_dict, "block3.") + count_blocks(state_dict, "block4."),
            "num_heads": guess_heads(math.gcd(d, last[0])), "mlp_ratios": mlp_ratio_from(hidden[0], last[0]),
            "num_classes": head[0], "in_channels": first[1], "kd": shape_of(state_dict, "head_kd.weight") is not None}


@register_model(
    ARCH, family="spike_driven_transformer_v2",
    default_cfg=dict(img_size=224, in_channels=3, num_classes=1000, embed_dims=512, num_heads=8, mlp_ratios=4,
                     depths=8, T=4),
    tiny_cfg=dict(img_size=64, num_classes=10, embed_dims=32, num_heads=1, mlp_ratios=2, depths=1, T=2),
    input_shape=image_input_shape, detect=detect)
class Spiking_vit_MetaFormer(nn.Module):  # noqa: N801 - the public class name
    """Meta-SpikeFormer {depths}-{embed_dims} (default: the public metaspikformer_8_512, 55 M parameters).

    Args:
        img_size: square input size; a multiple of 16.
        in_channels, num_classes: input channels and classes.
        embed_dims: D, the width of block3 (the conv stages have D/8, D/4, D/2; block4 has 5D/4); a multiple of 8.
        num_heads: heads of block3 and block4; must divide D and 5D/4.
        mlp_ratios: expansion of the conv blocks' 3×3 convs and of the MLPs.
        depths: transformer blocks (block3 + block4, see stage_depths).
        T: time steps (the public forward fixes T=1; the paper fine-tunes to T=4).
        input_mode: "static" repeats a [B, C, H, W] input T times; "events" takes [B, T, C, H, W] frames.
        kd: add the public distillation head `head_kd`.
    """

    def __init__(self, img_size: int = 224, in_channels: int = 3, num_classes: int = 1000, embed_dims: int = 512,
                 num_heads: int = 8, mlp_ratios: float = 4, depths: int = 8, T: int = 4, input_mode: str = "static",
                 kd: bool = False) -> None:
        super().__init__()
        check_transformer_dims(ARCH, embed_dims, num_heads, mlp_ratios, depths, T, num_classes, in_channels)
        check_image_size(ARCH, img_size, DOWNSAMPLE)
        widths = [embed_dims // 4, embed_dims // 2, embed_dims, embed_dims * 5 // 4]
        if widths[3] % num_heads:
            raise ModelError(f"Model '{ARCH}' needs num_heads ({num_heads}) to divide the block4 width "
                             f"5·embed_dims/4 ({widths[3]}).")
        if not isinstance(kd, bool):
            raise ModelError(f"Model '{ARCH}' needs kd to be true or false, got {kd!r}.")
        self.T = T
        self.input_mode = check_input_mode(ARCH, input_mode)
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.depths = depths
        self.kd = kd
        self.num_patches = (img_size // DOWNSAMPLE) ** 2
        self.input_shape = image_input_shape(dict(in_channels=in_channels, img_size=img_size, T=T,
                                                  input_mode=input_mode))
        d0, d1, d2, d3 = widths
        n3, n4 = stage_depths(depths)

        def hidden_of(d: int) -> int:
            return int(d * mlp_ratios)

        def down(cin: int, cout: int, stride: int = 2) -> MS_DownSampling:
            return MS_DownSampling(cin, cout, kernel_size=3, stride=stride, padding=1, first_layer=False)

        self.downsample1_1 = MS_DownSampling(in_channels, d0 // 2, kernel_size=7, stride=2, padding=3,
                                             first_layer=True)
        self.ConvBlock1_1 = nn.ModuleList([MS_ConvBlock(d0 // 2, hidden_of(d0 // 2))])  # noqa: N815
        self.downsample1_2 = down(d0 // 2, d0)
        self.ConvBlock1_2 = nn.ModuleList([MS_ConvBlock(d0, hidden_of(d0))])  # noqa: N815
        self.downsample2 = down(d0, d1)
        self.ConvBlock2_1 = nn.ModuleList([MS_ConvBlock(d1, hidden_of(d1))])  # noqa: N815
        self.ConvBlock2_2 = nn.ModuleList([MS_ConvBlock(d1, hidden_of(d1))])  # noqa: N815
        self.downsample3 = down(d1, d2)
        self.block3 = nn.ModuleList([MS_Block(d2, num_heads, hidden_of(d2)) for _ in range(n3)])
        self.downsample4 = down(d2, d3, stride=1)
        self.block4 = nn.ModuleList([MS_Block(d3, num_heads, hidden_of(d3)) for _ in range(n4)])
        self.lif = lif()
        self.head = nn.Linear(d3, num_classes)
        if kd:
            self.head_kd = nn.Linear(d3, num_classes)
        self.apply(init_linear_trunc_normal)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[T, B, C, H, W] -> the last stage's output averaged over tokens, [T, B, 5D/4]."""
        x = self.downsample1_1(x)
        for blk in self.ConvBlock1_1:
            x = blk(x)
        x = self.downsample1_2(x)
        for blk in self.ConvBlock1_2:
            x = blk(x)
        x = self.downsample2(x)
        for blk in self.ConvBlock2_1:
            x = blk(x)
        for blk in self.ConvBlock2_2:
            x = blk(x)
        x = self.downsample3(x)
        for blk in self.block3:
            x = blk(x)
        x = self.downsample4(x)
        for blk in self.block4:
            x = blk(x)
        return x.flatten(3).mean(3)

    def forward(self, x: torch.Tensor):
        s = self.lif(self.forward_features(time_first_image(x, self.T, self.input_mode)))
        logits = self.head(s.mean(0))  # the public head per step then the mean over T: equal by linearity
        if not self.kd:
            return logits
        logits_kd = self.head_kd(s.mean(0))
        if self.training:
            return logits, logits_kd
        return (logits + logits_kd) / 2
