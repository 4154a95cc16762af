"""Spikformer for ImageNet (Zhou et al., ICLR 2023).

Mirrors ZK-Zhou/spikformer, imagenet/model.py (classes SPS, SSA, MLP, Block, Spikformer): attribute names and
parameter shapes match that file, so its checkpoints load with strict=True. Layout is [T, B, C, H, W]; q/k/v
are Conv1d(k=1, bias=False) + BatchNorm1d + LIF, the projection a Conv1d(k=1, with bias) + BN1d + LIF, the MLP
Conv2d 1×1 + BN2d + LIF. Attention computes kᵀ @ v first (a d×d map per head), then (q @ kᵀv) * 0.125 — never
the N×N map. The tokenizer max-pools after each of its four conv stages (/16: 224 px -> 14×14 tokens). The
public Block's never-called LayerNorms norm1/norm2 are kept (as UnusedParameters) for strict loading.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bestcompress.zoo._common import (
    UnusedParameters, check_image_size, check_input_mode, check_patch_size, check_transformer_dims, image_input_shape,
    infer_sizes, init_linear_trunc_normal, lif, split_heads, split_tb3, split_tb4, time_first_image,
)
from bestcompress.zoo.registry import register_model

ARCH = "spikformer_imagenet"


class SPS(nn.Module):
    """Four conv3×3+BN+LIF stages, each followed by a max-pool (/16), then a relative-position
    conv3×3+BN+LIF added to its input. [T, B, C, H, W] -> [T, B, D, H/16, W/16]."""

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        widths = [in_channels, embed_dims // 8, embed_dims // 4, embed_dims // 2, embed_dims]
        for i, suffix in enumerate(["", "1", "2", "3"]):
            setattr(self, f"proj_conv{suffix}", nn.Conv2d(widths[i], widths[i + 1], 3, 1, 1, bias=False))
            setattr(self, f"proj_bn{suffix}", nn.BatchNorm2d(widths[i + 1]))
            setattr(self, f"proj_lif{suffix}", lif())
            setattr(self, f"maxpool{suffix}", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.rpe_conv = nn.Conv2d(embed_dims, embed_dims, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(embed_dims)
        self.rpe_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = self.proj_lif(split_tb4(self.proj_bn(self.proj_conv(x.flatten(0, 1))), T, B))
        x = self.maxpool(x.flatten(0, 1))
        x = self.proj_lif1(split_tb4(self.proj_bn1(self.proj_conv1(x)), T, B))
        x = self.maxpool1(x.flatten(0, 1))
        x = self.proj_lif2(split_tb4(self.proj_bn2(self.proj_conv2(x)), T, B))
        x = self.maxpool2(x.flatten(0, 1))
        x = self.proj_lif3(split_tb4(self.proj_bn3(self.proj_conv3(x)), T, B))
        x = self.maxpool3(x.flatten(0, 1))
        feat = split_tb4(x, T, B)
        x = self.rpe_lif(split_tb4(self.rpe_bn(self.rpe_conv(x)), T, B))
        return x + feat


class SSA(nn.Module):
    """Spiking self-attention on [T, B, C, H, W], kᵀv first: y = LIF_0.5((q @ (kᵀ @ v)) * scale);
    out = LIF(BN(Conv1d(y)))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 0.125
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_conv", nn.Conv1d(dim, dim, kernel_size=1, stride=1, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", lif())
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1, stride=1)
        self.proj_bn = nn.BatchNorm1d(dim)
        self.proj_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        xf = x.flatten(3).flatten(0, 1)  # [T*B, C, N]
        h, d = self.num_heads, self.head_dim
        q = split_heads(self.q_lif(split_tb3(self.q_bn(self.q_conv(xf)), T, B)), T, B, h, d)
        k = split_heads(self.k_lif(split_tb3(self.k_bn(self.k_conv(xf)), T, B)), T, B, h, d)
        v = split_heads(self.v_lif(split_tb3(self.v_bn(self.v_conv(xf)), T, B)), T, B, h, d)
        kv = k.transpose(-2, -1) @ v
        x = (q @ kv) * self.scale
        x = self.attn_lif(x.transpose(3, 4).reshape(T, B, C, -1))  # [T, B, C, N]
        x = self.proj_bn(self.proj_conv(x.flatten(0, 1)))
        return self.proj_lif(x.reshape(T, B, C, H, W))


class MLP(nn.Module):
    """LIF(BN(Conv2d 1×1 D→hidden)) then LIF(BN(Conv2d 1×1 hidden→D)) on [T, B, C, H, W]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1_conv = nn.Conv2d(dim, hidden, kernel_size=1, stride=1)
        self.fc1_bn = nn.BatchNorm2d(hidden)
        self.fc1_lif = lif()
        self.fc2_conv = nn.Conv2d(hidden, dim, kernel_size=1, stride=1)
        self.fc2_bn = nn.BatchNorm2d(dim)
        self.fc2_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = self.fc1_lif(split_tb4(self.fc1_bn(self.fc1_conv(x.flatten(0, 1))), T, B))
        return self.fc2_lif(split_tb4(self.fc2_bn(self.fc2_conv(x.flatten(0, 1))), T, B))


class Block(nn.Module):
    """x + SSA(x), then + MLP(x); norm1/norm2 are the public checkpoints' never-called LayerNorms."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = UnusedParameters(weight=(dim,), bias=(dim,))
        self.attn = SSA(dim, num_heads)
        self.norm2 = UnusedParameters(weight=(dim,), bias=(dim,))
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


def detect(state_dict: Mapping) -> dict | None:
    return infer_sizes(state_dict, first_conv="patch_embed.proj_conv.weight", width="patch_embed.rpe_conv.weight",
                       mlp_in="block.0.mlp.fc1_conv.weight", markers=("block.0.attn.q_conv.weight",))


@register_model(
    ARCH, family="spikformer",
    default_cfg=dict(img_size=224, patch_size=16, in_channels=3, num_classes=1000, embed_dims=512, num_heads=8,
                     mlp_ratios=4, depths=8, T=4),
    tiny_cfg=dict(img_size=32, num_classes=10, embed_dims=64, num_heads=2, depths=2, T=2),
    input_shape=image_input_shape, detect=detect)
class SpikformerImageNet(nn.Module):
    """Spikformer-{depths}-{embed_dims} for ImageNet-size images (224 px, 14×14 tokens).

    Args:
        img_size: square input size; a multiple of 16.
        patch_size: the tokenizer's downsampling (fixed at 16 by its four max-pools; kept for public configs).
        in_channels, num_classes: input channels and classes.
        embed_dims, num_heads, mlp_ratios, depths: transformer width, heads, MLP expansion and depth.
        T: time steps (the public forward hard-codes 4).
        input_mode: "static" repeats a [B, C, H, W] input T times; "events" takes [B, T, C, H, W] frames.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_channels: int = 3, num_classes: int = 1000,
                 embed_dims: int = 512, num_heads: int = 8, mlp_ratios: float = 4, depths: int = 8, T: int = 4,
                 input_mode: str = "static") -> None:
        super().__init__()
        hidden = check_transformer_dims(ARCH, embed_dims, num_heads, mlp_ratios, depths, T, num_classes,
                                        in_channels)
        check_patch_size(ARCH, patch_size, 16)
        check_image_size(ARCH, img_size, 16)
        self.T = T
        self.input_mode = check_input_mode(ARCH, input_mode)
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_patches = (img_size // 16) ** 2
        self.input_shape = image_input_shape(dict(in_channels=in_channels, img_size=img_size, T=T,
                                                  input_mode=input_mode))
        self.patch_embed = SPS(in_channels, embed_dims)
        self.block = nn.ModuleList([Block(embed_dims, num_heads, hidden) for _ in range(depths)])
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
