"""Spike-driven Transformer v1 (Yao et al., NeurIPS 2023).

Mirrors BICLab/Spike-Driven-Transformer, model/spikeformer.py (SpikeDrivenTransformer), module/sps.py (MS_SPS)
and module/ms_conv.py (MS_SSA_Conv, MS_MLP_Conv, MS_Block_Conv) with spike_mode="lif" and dvs_mode=False:
attribute names and parameter shapes match, so its checkpoints load with strict=True. Layout [T, B, C, H, W].

Attention has no matmul (spike-driven self-attention, Hadamard form): s = shortcut_lif(x);
q, k, v = LIF(BN(Conv2d 1×1(s))); kv = LIF_0.5(sum over tokens of k ⊙ v) ("talking_heads_lif");
y = q ⊙ kv; out = BN(Conv2d 1×1(y)) + x. The public module also creates `talking_heads` (Conv1d heads→heads)
and `attn_lif` that forward never uses; talking_heads' weight is in the checkpoints and kept here as
UnusedParameters (which also lets detect read the number of heads from its shape).
The MLP adds its own residual (and an inner one when hidden == dim, as public). The head is
LIF → mean over T → Linear (public: Linear per step then mean over T, equal by linearity).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bestcompress.errors import ModelError
from bestcompress.zoo._common import (
    UnusedParameters, check_image_size, check_input_mode, check_transformer_dims, image_input_shape, infer_sizes, lif,
    split_heads, split_tb4, time_first_image,
)
from bestcompress.zoo.registry import register_model

ARCH = "sdt_v1"


class MS_SPS(nn.Module):
    """Four conv3×3+BN stages with a LIF after the first three and an optional max-pool after each
    (pooling_stat, e.g. "0011" for CIFAR, "1111" for ImageNet), then x + BN(rpe_conv(LIF(x))).
    [T, B, C, H, W] -> [T, B, D, H', W'], real-valued."""

    def __init__(self, in_channels: int, embed_dims: int, pooling_stat: str) -> None:
        super().__init__()
        self.pool = tuple(c == "1" for c in pooling_stat)
        widths = [in_channels, embed_dims // 8, embed_dims // 4, embed_dims // 2, embed_dims]
        for i, suffix in enumerate(["", "1", "2", "3"]):
            setattr(self, f"proj_conv{suffix}", nn.Conv2d(widths[i], widths[i + 1], 3, 1, 1, bias=False))
            setattr(self, f"proj_bn{suffix}", nn.BatchNorm2d(widths[i + 1]))
            setattr(self, f"proj_lif{suffix}", lif())
            setattr(self, f"maxpool{suffix}", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.rpe_conv = nn.Conv2d(embed_dims, embed_dims, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = self.proj_lif(split_tb4(self.proj_bn(self.proj_conv(x.flatten(0, 1))), T, B)).flatten(0, 1)
        if self.pool[0]:
            x = self.maxpool(x)
        x = self.proj_lif1(split_tb4(self.proj_bn1(self.proj_conv1(x)), T, B)).flatten(0, 1)
        if self.pool[1]:
            x = self.maxpool1(x)
        x = self.proj_lif2(split_tb4(self.proj_bn2(self.proj_conv2(x)), T, B)).flatten(0, 1)
        if self.pool[2]:
            x = self.maxpool2(x)
        x = self.proj_bn3(self.proj_conv3(x))
        if self.pool[3]:
            x = self.maxpool3(x)
        feat = x
        x = self.proj_lif3(split_tb4(x, T, B)).flatten(0, 1)
        x = self.rpe_bn(self.rpe_conv(x))
        return split_tb4(x + feat, T, B)


class MS_SSA_Conv(nn.Module):
    """Spike-driven self-attention (Hadamard, no matmul) with its own residual, on [T, B, C, H, W]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_conv", nn.Conv2d(dim, dim, kernel_size=1, stride=1, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm2d(dim))
            setattr(self, f"{name}_lif", lif())
        self.talking_heads = UnusedParameters(weight=(num_heads, num_heads, 1))
        self.talking_heads_lif = lif(v_threshold=0.5)
        self.proj_conv = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
        self.proj_bn = nn.BatchNorm2d(dim)
        self.shortcut_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        identity = x
        xf = self.shortcut_lif(x).flatten(0, 1)
        h, d = self.num_heads, self.head_dim
        q = split_heads(self.q_lif(split_tb4(self.q_bn(self.q_conv(xf)), T, B)).flatten(3), T, B, h, d)
        k = split_heads(self.k_lif(split_tb4(self.k_bn(self.k_conv(xf)), T, B)).flatten(3), T, B, h, d)
        v = split_heads(self.v_lif(split_tb4(self.v_bn(self.v_conv(xf)), T, B)).flatten(3), T, B, h, d)
        kv = self.talking_heads_lif(k.mul(v).sum(dim=-2, keepdim=True))  # [T, B, h, 1, d]
        x = q.mul(kv)
        x = x.transpose(3, 4).reshape(T, B, C, H, W)
        x = split_tb4(self.proj_bn(self.proj_conv(x.flatten(0, 1))), T, B)
        return x + identity


class MS_MLP_Conv(nn.Module):
    """BN(Conv2d 1×1(LIF(x))) D→hidden, then hidden→D, plus the residual, on [T, B, C, H, W]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.res = dim == hidden
        self.fc1_conv = nn.Conv2d(dim, hidden, kernel_size=1, stride=1)
        self.fc1_bn = nn.BatchNorm2d(hidden)
        self.fc1_lif = lif()
        self.fc2_conv = nn.Conv2d(hidden, dim, kernel_size=1, stride=1)
        self.fc2_bn = nn.BatchNorm2d(dim)
        self.fc2_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        identity = x
        x = split_tb4(self.fc1_bn(self.fc1_conv(self.fc1_lif(x).flatten(0, 1))), T, B)
        if self.res:
            x = identity + x
            identity = x
        x = split_tb4(self.fc2_bn(self.fc2_conv(self.fc2_lif(x).flatten(0, 1))), T, B)
        return x + identity


class MS_Block_Conv(nn.Module):
    """attn then mlp, each with its residual inside."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.attn = MS_SSA_Conv(dim, num_heads)
        self.mlp = MS_MLP_Conv(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


def detect(state_dict: Mapping) -> dict | None:
    cfg = infer_sizes(state_dict, first_conv="patch_embed.proj_conv.weight", width="patch_embed.rpe_conv.weight",
                      mlp_in="block.0.mlp.fc1_conv.weight", markers=("block.0.attn.talking_heads.weight",))
    if cfg is None:
        return None
    cfg["num_heads"] = state_dict["block.0.attn.talking_heads.weight"].shape[0]
    if cfg["num_classes"] == 1000:  # pooling leaves no trace in the weights: assume the public ImageNet setting
        cfg.update(img_size=224, pooling_stat="1111")
    return cfg


@register_model(
    ARCH, family="spike_driven_transformer",
    default_cfg=dict(img_size=32, in_channels=3, num_classes=10, embed_dims=512, num_heads=8, mlp_ratios=4,
                     depths=2, T=4, pooling_stat="0011"),
    tiny_cfg=dict(img_size=16, embed_dims=64, num_heads=2, depths=2, T=2),
    input_shape=image_input_shape, detect=detect)
class SpikeDrivenTransformer(nn.Module):
    """Spike-driven Transformer v1, {depths}-{embed_dims} (default: the public CIFAR-10 2-512 config).

    Args:
        img_size: square input size; a multiple of 2**(number of pools).
        in_channels, num_classes: input channels and classes.
        embed_dims, num_heads, mlp_ratios, depths: transformer width, heads, MLP expansion and depth.
        T: time steps.
        pooling_stat: four '0'/'1' flags, a max-pool after each tokenizer stage ("0011" CIFAR, "1111" ImageNet).
        input_mode: "static" repeats a [B, C, H, W] input T times; "events" takes [B, T, C, H, W] frames.
    """

    def __init__(self, img_size: int = 32, in_channels: int = 3, num_classes: int = 10, embed_dims: int = 512,
                 num_heads: int = 8, mlp_ratios: float = 4, depths: int = 2, T: int = 4,
                 pooling_stat: str = "0011", input_mode: str = "static") -> None:
        super().__init__()
        hidden = check_transformer_dims(ARCH, embed_dims, num_heads, mlp_ratios, depths, T, num_classes,
                                        in_channels)
        if not (isinstance(pooling_stat, str) and len(pooling_stat) == 4 and set(pooling_stat) <= {"0", "1"}):
            raise ModelError(f"Model '{ARCH}' needs pooling_stat to be four '0'/'1' characters such as '0011', "
                             f"got {pooling_stat!r}.")
        downsample = 2 ** pooling_stat.count("1")
        check_image_size(ARCH, img_size, downsample)
        self.T = T
        self.input_mode = check_input_mode(ARCH, input_mode)
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_patches = (img_size // downsample) ** 2
        self.input_shape = image_input_shape(dict(in_channels=in_channels, img_size=img_size, T=T,
                                                  input_mode=input_mode))
        self.patch_embed = MS_SPS(in_channels, embed_dims, pooling_stat)
        self.block = nn.ModuleList([MS_Block_Conv(embed_dims, num_heads, hidden) for _ in range(depths)])
        self.head_lif = lif()
        self.head = nn.Linear(embed_dims, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # public init: Conv2d weights trunc_normal(0.02), zero biases; BatchNorm2d weight 1, bias 0
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[T, B, C, H, W] -> residual stream averaged over tokens, [T, B, D]."""
        x = self.patch_embed(x)
        for blk in self.block:
            x = blk(x)
        return x.flatten(3).mean(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(time_first_image(x, self.T, self.input_mode))
        return self.head(self.head_lif(x).mean(0))
