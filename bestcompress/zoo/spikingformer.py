"""Spikingformer (Zhou et al., 2023): the pre-neuron Spikformer, for CIFAR-size and ImageNet-size images.

Mirrors zhouchenlin2096/Spikingformer, cifar10/model.py (classes SpikingTokenizer, SpikingSelfAttention, MLP,
SpikingTransformer, vit_snn) and imagenet/model.py (its SpikingTokenizer, see `tokenizer` below): attribute names
and parameter shapes match those files, so their checkpoints load with strict=True. It is also the backbone of
BESTformer (CaoHLin/BESTFormer cifar/model.py), which keeps these names. Every conv is preceded by a LIF (its input
is spikes); the residual stream is real-valued; the CIFAR tokenizer is block0 (conv+BN, fed by the raw image) then
block1..4 (LIF, [max-pool in 3 and 4], conv, BN).

Tokenizer: `tokenizer="cifar"` (default) is the CIFAR stem above (/4, keys block{i}_*). `tokenizer="imagenet"` is
the public imagenet/model.py SpikingTokenizer, the ImageNet-size patch splitting: conv+BN on the image
(proj_conv/proj_bn), then four times LIF, max-pool, conv3×3, BN (proj{i}_lif, maxpool{i}, proj{i}_conv, proj{i}_bn,
i = 1..4), widths in -> D/8 -> D/4 -> D/2 -> D -> D, /16 overall (224 px: 14×14 tokens; patch_size 16). The
ImageNet blocks have the same names as the CIFAR ones; the ImageNet code computes kᵀ·v first (attn_order
"kv_first"), which detect sets for such checkpoints.

Attention order: the public CIFAR code computes attn = q @ kᵀ (the N×N map) and (attn @ v) * 0.125, while its
ImageNet code computes kᵀ @ v first and q @ (kᵀv) * 0.125. `attn_order` selects either ("qk_first" default,
as in the CIFAR code; "kv_first" as in the ImageNet code); key names are the same. With binary q, k, v both
orders give the same values. The public block's never-called LayerNorms norm1/norm2 are kept (as
UnusedParameters) for strict loading.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bestcompress.errors import ModelError
from bestcompress.zoo._common import (
    UnusedParameters, check_image_size, check_input_mode, check_patch_size, check_transformer_dims, image_input_shape,
    infer_sizes, init_linear_trunc_normal, lif, split_heads, split_tb3, split_tb4, time_first_image,
)
from bestcompress.zoo.registry import register_model

ARCH = "spikingformer"
ATTN_ORDERS = ("qk_first", "kv_first")
TOKENIZERS = {"cifar": 4, "imagenet": 16}  # tokenizer -> its downsampling (the patch size)


class SpikingTokenizer(nn.Module):
    """block0: conv3×3+BN on the input; block1..4: LIF, (max-pool in 3, 4), conv3×3, BN. /4 overall.
    [T, B, C, H, W] -> [T, B, D, H/4, W/4], real-valued (the next layer starts with a LIF)."""

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        widths = [in_channels, embed_dims // 8, embed_dims // 4, embed_dims // 2, embed_dims, embed_dims]
        for i in range(5):
            if i > 0:
                setattr(self, f"block{i}_lif", lif())
            if i >= 3:
                setattr(self, f"block{i}_mp", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            setattr(self, f"block{i}_conv", nn.Conv2d(widths[i], widths[i + 1], 3, 1, 1, bias=False))
            setattr(self, f"block{i}_bn", nn.BatchNorm2d(widths[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = split_tb4(self.block0_bn(self.block0_conv(x.flatten(0, 1))), T, B)
        x = split_tb4(self.block1_bn(self.block1_conv(self.block1_lif(x).flatten(0, 1))), T, B)
        x = split_tb4(self.block2_bn(self.block2_conv(self.block2_lif(x).flatten(0, 1))), T, B)
        x = self.block3_mp(self.block3_lif(x).flatten(0, 1))
        x = split_tb4(self.block3_bn(self.block3_conv(x)), T, B)
        x = self.block4_mp(self.block4_lif(x).flatten(0, 1))
        return split_tb4(self.block4_bn(self.block4_conv(x)), T, B)


class SpikingTokenizerImageNet(nn.Module):
    """The public ImageNet SpikingTokenizer: conv3×3+BN on the input, then four times LIF, max-pool, conv3×3, BN.
    [T, B, C, H, W] -> [T, B, D, H/16, W/16], real-valued (the next layer starts with a LIF)."""

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        widths = [in_channels, embed_dims // 8, embed_dims // 4, embed_dims // 2, embed_dims, embed_dims]
        self.proj_conv = nn.Conv2d(in_channels, widths[1], 3, 1, 1, bias=False)
        self.proj_bn = nn.BatchNorm2d(widths[1])
        for i in range(1, 5):
            setattr(self, f"proj{i}_lif", lif())
            setattr(self, f"maxpool{i}", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            setattr(self, f"proj{i}_conv", nn.Conv2d(widths[i], widths[i + 1], 3, 1, 1, bias=False))
            setattr(self, f"proj{i}_bn", nn.BatchNorm2d(widths[i + 1]))

    def _stage(self, i: int, x: torch.Tensor, T, B) -> torch.Tensor:
        x = getattr(self, f"maxpool{i}")(getattr(self, f"proj{i}_lif")(x).flatten(0, 1))
        return split_tb4(getattr(self, f"proj{i}_bn")(getattr(self, f"proj{i}_conv")(x)), T, B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = split_tb4(self.proj_bn(self.proj_conv(x.flatten(0, 1))), T, B)
        for i in range(1, 5):
            x = self._stage(i, x, T, B)
        return x


class SpikingSelfAttention(nn.Module):
    """Pre-neuron spiking self-attention on [T, B, C, H, W]: s = LIF(x); q, k, v = LIF(BN(Conv1d(s)));
    y = LIF_0.5(q kᵀ v * 0.125) in the order `attn_order`; out = BN(Conv1d(y))."""

    def __init__(self, dim: int, num_heads: int, attn_order: str = "qk_first") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 0.125
        self.attn_order = attn_order
        self.proj_lif = lif()
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_conv", nn.Conv1d(dim, dim, kernel_size=1, stride=1, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", lif())
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1, stride=1)
        self.proj_bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        xf = self.proj_lif(x).flatten(3).flatten(0, 1)  # [T*B, C, N] spikes
        h, d = self.num_heads, self.head_dim
        q = split_heads(self.q_lif(split_tb3(self.q_bn(self.q_conv(xf)), T, B)), T, B, h, d)
        k = split_heads(self.k_lif(split_tb3(self.k_bn(self.k_conv(xf)), T, B)), T, B, h, d)
        v = split_heads(self.v_lif(split_tb3(self.v_bn(self.v_conv(xf)), T, B)), T, B, h, d)
        if self.attn_order == "kv_first":
            kv = k.transpose(-2, -1) @ v
            x = (q @ kv) * self.scale
        else:
            attn = q @ k.transpose(-2, -1)
            x = (attn @ v) * self.scale
        x = self.attn_lif(x.transpose(3, 4).reshape(T, B, C, -1))  # [T, B, C, N]
        x = self.proj_bn(self.proj_conv(x.flatten(0, 1)))
        return x.reshape(T, B, C, H, W)


class MLP(nn.Module):
    """BN(Conv2d 1×1(LIF(x))) D→hidden, then the same hidden→D, on [T, B, C, H, W]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp1_lif = lif()
        self.mlp1_conv = nn.Conv2d(dim, hidden, kernel_size=1, stride=1)
        self.mlp1_bn = nn.BatchNorm2d(hidden)
        self.mlp2_lif = lif()
        self.mlp2_conv = nn.Conv2d(hidden, dim, kernel_size=1, stride=1)
        self.mlp2_bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = split_tb4(self.mlp1_bn(self.mlp1_conv(self.mlp1_lif(x).flatten(0, 1))), T, B)
        return split_tb4(self.mlp2_bn(self.mlp2_conv(self.mlp2_lif(x).flatten(0, 1))), T, B)


class SpikingTransformer(nn.Module):
    """x + attn(x), then + mlp(x); norm1/norm2 are the public checkpoints' never-called LayerNorms."""

    def __init__(self, dim: int, num_heads: int, hidden: int, attn_order: str = "qk_first") -> None:
        super().__init__()
        self.norm1 = UnusedParameters(weight=(dim,), bias=(dim,))
        self.attn = SpikingSelfAttention(dim, num_heads, attn_order)
        self.norm2 = UnusedParameters(weight=(dim,), bias=(dim,))
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


def detect(state_dict: Mapping) -> dict | None:
    cfg = infer_sizes(state_dict, first_conv="patch_embed.block0_conv.weight",
                      width="patch_embed.block4_conv.weight", mlp_in="block.0.mlp.mlp1_conv.weight")
    if cfg is not None:
        return cfg
    cfg = infer_sizes(state_dict, first_conv="patch_embed.proj_conv.weight", width="patch_embed.proj4_conv.weight",
                      mlp_in="block.0.mlp.mlp1_conv.weight", markers=("patch_embed.proj1_conv.weight",))
    if cfg is not None:  # the image size leaves no trace: the public ImageNet setting
        cfg.update(tokenizer="imagenet", img_size=224, patch_size=16, attn_order="kv_first")
    return cfg


@register_model(
    ARCH, family="spikingformer",
    default_cfg=dict(img_size=32, patch_size=4, in_channels=3, num_classes=10, embed_dims=384, num_heads=8,
                     mlp_ratios=4, depths=4, T=4),
    tiny_cfg=dict(img_size=16, embed_dims=64, num_heads=2, depths=2, T=2),
    input_shape=image_input_shape, detect=detect)
class Spikingformer(nn.Module):
    """Spikingformer-{depths}-{embed_dims} (CIFAR: 32 px, 8×8 tokens; ImageNet: tokenizer="imagenet", 224 px, 14×14).

    Args:
        img_size: square input size; a multiple of the tokenizer's downsampling.
        patch_size: the tokenizer's downsampling (fixed by its max-pools: 4 or 16; kept for public configs).
        in_channels, num_classes: input channels and classes.
        embed_dims, num_heads, mlp_ratios, depths: transformer width, heads, MLP expansion and depth.
        T: time steps.
        input_mode: "static" repeats a [B, C, H, W] input T times; "events" takes [B, T, C, H, W] frames.
        attn_order: "qk_first" ((q kᵀ) v, public CIFAR code) or "kv_first" (q (kᵀ v), public ImageNet code).
        tokenizer: "cifar" (/4, patch_size 4) or "imagenet" (the ImageNet stem, /16, patch_size 16; e.g. the public
            Spikingformer-8-512: img_size=224, patch_size=16, embed_dims=512, depths=8, num_classes=1000).
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 embed_dims: int = 384, num_heads: int = 8, mlp_ratios: float = 4, depths: int = 4, T: int = 4,
                 input_mode: str = "static", attn_order: str = "qk_first", tokenizer: str = "cifar") -> None:
        super().__init__()
        hidden = check_transformer_dims(ARCH, embed_dims, num_heads, mlp_ratios, depths, T, num_classes,
                                        in_channels)
        if tokenizer not in TOKENIZERS:
            raise ModelError(f"Model '{ARCH}' needs tokenizer to be one of {', '.join(TOKENIZERS)}, "
                             f"got {tokenizer!r}.")
        downsample = TOKENIZERS[tokenizer]
        check_patch_size(ARCH, patch_size, downsample)
        check_image_size(ARCH, img_size, downsample)
        if attn_order not in ATTN_ORDERS:
            raise ModelError(f"Model '{ARCH}' needs attn_order to be one of {', '.join(ATTN_ORDERS)}, "
                             f"got {attn_order!r}.")
        self.T = T
        self.input_mode = check_input_mode(ARCH, input_mode)
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_patches = (img_size // downsample) ** 2
        self.input_shape = image_input_shape(dict(in_channels=in_channels, img_size=img_size, T=T,
                                                  input_mode=input_mode))
        stem = SpikingTokenizerImageNet if tokenizer == "imagenet" else SpikingTokenizer
        self.patch_embed = stem(in_channels, embed_dims)
        self.block = nn.ModuleList([SpikingTransformer(embed_dims, num_heads, hidden, attn_order)
                                    for _ in range(depths)])
        self.head = nn.Linear(embed_dims, num_classes)
        self.apply(init_linear_trunc_normal)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[T, B, C, H, W] -> residual stream averaged over tokens, [T, B, D]."""
        x = self.patch_embed(x)
        for blk in self.block:
            x = blk(x)
        return x.flatten(3).mean(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(time_first_image(x, self.T, self.input_mode))
        return self.head(x.mean(0))
