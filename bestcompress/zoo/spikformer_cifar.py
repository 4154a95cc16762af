"""Spikformer for CIFAR (Zhou et al., ICLR 2023).

Mirrors ZK-Zhou/spikformer, cifar10/model.py (classes SPS, SSA, MLP, Block, Spikformer): attribute names and
parameter shapes match that file, so its checkpoints load with strict=True. Layout inside the blocks is
[T, B, N, C]; q/k/v/proj/MLP are nn.Linear + BatchNorm1d + LIF (post-neuron design, spikes on the residual
branches). Attention forms the N×N map: attn = (q @ kᵀ) * 0.125, then attn @ v. The public Block creates two
LayerNorms (norm1, norm2) that forward never calls; their parameters are kept (as UnusedParameters) because the
checkpoints contain them.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bestcompress.zoo._common import (
    UnusedParameters, check_image_size, check_input_mode, check_patch_size, check_transformer_dims, image_input_shape,
    infer_sizes, init_linear_trunc_normal, lif, split_tb4, time_first_image,
)
from bestcompress.zoo.registry import register_model

ARCH = "spikformer_cifar"


class SPS(nn.Module):
    """Spiking patch splitting: four conv3×3+BN+LIF stages (max-pool after the last two, so /4), then a
    relative-position conv3×3+BN+LIF added to its input. [T, B, C, H, W] -> [T, B, N, D]."""

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        widths = [in_channels, embed_dims // 8, embed_dims // 4, embed_dims // 2, embed_dims]
        for i, suffix in enumerate(["", "1", "2", "3"]):
            setattr(self, f"proj_conv{suffix}", nn.Conv2d(widths[i], widths[i + 1], 3, 1, 1, bias=False))
            setattr(self, f"proj_bn{suffix}", nn.BatchNorm2d(widths[i + 1]))
            setattr(self, f"proj_lif{suffix}", lif())
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.maxpool3 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.rpe_conv = nn.Conv2d(embed_dims, embed_dims, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(embed_dims)
        self.rpe_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = self.proj_lif(split_tb4(self.proj_bn(self.proj_conv(x.flatten(0, 1))), T, B))
        x = self.proj_lif1(split_tb4(self.proj_bn1(self.proj_conv1(x.flatten(0, 1))), T, B))
        x = self.proj_lif2(split_tb4(self.proj_bn2(self.proj_conv2(x.flatten(0, 1))), T, B))
        x = self.maxpool2(x.flatten(0, 1))
        x = self.proj_lif3(split_tb4(self.proj_bn3(self.proj_conv3(x)), T, B))
        x = self.maxpool3(x.flatten(0, 1))
        feat = split_tb4(x, T, B)
        x = self.rpe_lif(split_tb4(self.rpe_bn(self.rpe_conv(x)), T, B))
        x = x + feat
        return x.flatten(-2).transpose(-1, -2)  # [T, B, N, D]


def _linear_bn(linear: nn.Linear, bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """Linear on [T*B, N, C] then BatchNorm1d over channels (BN wants [T*B, C, N])."""
    return bn(linear(x).transpose(-1, -2)).transpose(-1, -2)


class SSA(nn.Module):
    """Spiking self-attention on [T, B, N, C]: q, k, v = LIF(BN(Linear(x))); attn = (q @ kᵀ)·scale (N×N);
    y = LIF_0.5(attn @ v); out = LIF(BN(Linear(y)))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 0.125
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_linear", nn.Linear(dim, dim))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", lif())
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_linear = nn.Linear(dim, dim)
        self.proj_bn = nn.BatchNorm1d(dim)
        self.proj_lif = lif()

    def _split_heads(self, s: torch.Tensor, T, B, N) -> torch.Tensor:
        return s.reshape(T, B, N, self.num_heads, self.head_dim).permute(0, 1, 3, 2, 4)  # [T, B, h, N, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, N, C = x.shape
        xf = x.flatten(0, 1)
        q = self._split_heads(self.q_lif(_linear_bn(self.q_linear, self.q_bn, xf).reshape(T, B, N, C)), T, B, N)
        k = self._split_heads(self.k_lif(_linear_bn(self.k_linear, self.k_bn, xf).reshape(T, B, N, C)), T, B, N)
        v = self._split_heads(self.v_lif(_linear_bn(self.v_linear, self.v_bn, xf).reshape(T, B, N, C)), T, B, N)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = attn @ v
        x = self.attn_lif(x.transpose(2, 3).reshape(T, B, N, C))
        x = _linear_bn(self.proj_linear, self.proj_bn, x.flatten(0, 1)).reshape(T, B, N, C)
        return self.proj_lif(x)


class MLP(nn.Module):
    """LIF(BN(Linear D→hidden)) then LIF(BN(Linear hidden→D)) on [T, B, N, C]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc1_linear = nn.Linear(dim, hidden)
        self.fc1_bn = nn.BatchNorm1d(hidden)
        self.fc1_lif = lif()
        self.fc2_linear = nn.Linear(hidden, dim)
        self.fc2_bn = nn.BatchNorm1d(dim)
        self.fc2_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, N, C = x.shape
        x = self.fc1_lif(_linear_bn(self.fc1_linear, self.fc1_bn, x.flatten(0, 1)).reshape(T, B, N, self.hidden))
        return self.fc2_lif(_linear_bn(self.fc2_linear, self.fc2_bn, x.flatten(0, 1)).reshape(T, B, N, C))


class Block(nn.Module):
    """x + SSA(x), then + MLP(x). `unused_norms` keeps the public checkpoints' never-called norm1/norm2."""

    def __init__(self, dim: int, num_heads: int, hidden: int, unused_norms: bool = True) -> None:
        super().__init__()
        if unused_norms:
            self.norm1 = UnusedParameters(weight=(dim,), bias=(dim,))
        self.attn = SSA(dim, num_heads)
        if unused_norms:
            self.norm2 = UnusedParameters(weight=(dim,), bias=(dim,))
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


def detect(state_dict: Mapping) -> dict | None:
    return infer_sizes(state_dict, first_conv="patch_embed.proj_conv.weight", width="patch_embed.rpe_conv.weight",
                       mlp_in="block.0.mlp.fc1_linear.weight", markers=("block.0.attn.q_linear.weight",))


@register_model(
    ARCH, family="spikformer",
    default_cfg=dict(img_size=32, patch_size=4, in_channels=3, num_classes=10, embed_dims=384, num_heads=8,
                     mlp_ratios=4, depths=4, T=4),
    tiny_cfg=dict(img_size=16, embed_dims=64, num_heads=2, depths=2, T=2),
    input_shape=image_input_shape, detect=detect)
class SpikformerCifar(nn.Module):
    """Spikformer-{depths}-{embed_dims} for small images (CIFAR: 32 px, 8×8 tokens).

    Args:
        img_size: square input size; a multiple of 4.
        patch_size: the tokenizer's downsampling (fixed at 4 by its two max-pools; kept for public configs).
        in_channels, num_classes: input channels and classes.
        embed_dims, num_heads, mlp_ratios, depths: transformer width, heads, MLP expansion and depth.
        T: time steps.
        input_mode: "static" repeats a [B, C, H, W] input T times; "events" takes [B, T, C, H, W] frames.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 embed_dims: int = 384, num_heads: int = 8, mlp_ratios: float = 4, depths: int = 4, T: int = 4,
                 input_mode: str = "static") -> None:
        super().__init__()
        hidden = check_transformer_dims(ARCH, embed_dims, num_heads, mlp_ratios, depths, T, num_classes,
                                        in_channels)
        check_patch_size(ARCH, patch_size, 4)
        check_image_size(ARCH, img_size, 4)
        self.T = T
        self.input_mode = check_input_mode(ARCH, input_mode)
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_patches = (img_size // 4) ** 2
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
        return x.mean(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(time_first_image(x, self.T, self.input_mode))
        return self.head(x.mean(0))
