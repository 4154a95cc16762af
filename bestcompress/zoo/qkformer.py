"""QKFormer (Zhou et al., NeurIPS 2024): a hierarchical spiking transformer with Q-K attention.

Mirrors zhouchenlin2096/QKFormer, cifar10/model.py (spiking_transformer) and imagenet/qkformer.py
(hierarchical_spiking_transformer), classes PatchEmbedInit, PatchEmbeddingStage, Token_QK_Attention,
Spiking_Self_Attention, MLP, TokenSpikingTransformer, SpikingTransformer: attribute names, registration order and
parameter shapes match those files, so their checkpoints load with strict=True. Layout [T, B, C, H, W].

Three stages of widths D/4, D/2, D (D = embed_dims). patch_embed1 is the stem; patch_embed2 and patch_embed3 halve
the resolution (a conv branch with a max-pool beside a stride-2 1×1 conv shortcut, both ending in a LIF; their
spikes add). Stages 1 and 2 use Q-K token attention (no matmul: per head, LIF_0.5 of the sum of q over the head's
channels is a binary token mask that multiplies k); stage 3 uses spiking self-attention computing kᵀ·v first,
y = LIF_0.5(q (kᵀ v) · 0.125). The neurons follow each BN (post-neuron): the residual stream is a sum of spikes.

The two public files differ, selected by `layout`:
- "cifar" (cifar10/model.py): no down-sampling in the stem (/4 overall), stage blocks 1, 1, depths-2, the
  stage-3 attention is called `ssa`, MLP layers `mlp1_*`/`mlp2_*`, the stage max-pool after proj4.
- "imagenet" (imagenet/qkformer.py): a /4 stem (two max-pools, a third conv proj2, a stride-2 shortcut; /16
  overall), stage blocks 1, 2, depths-3, stage-3 attention `attn`, MLP layers `fc1_*`/`fc2_*`, max-pool after proj3.
The public CIFAR file fixes 8 heads; here num_heads (default 8) is used by every stage, as the ImageNet file does.
The never-used `qkv_mp` max-pool holds no parameters and is left out.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bestcompress.errors import ModelError
from bestcompress.zoo._common import (
    check_image_size, check_input_mode, check_int, check_patch_size, check_transformer_dims, count_blocks,
    guess_heads, image_input_shape, init_linear_trunc_normal, lif, mlp_ratio_from, shape_of, split_heads, split_tb3,
    split_tb4, time_first_image,
)
from bestcompress.zoo.registry import register_model

ARCH = "qkformer"
LAYOUTS = ("cifar", "imagenet")
# layout -> (overall downsampling, blocks in stage 1, blocks in stage 2, stage-3 attention name, MLP prefix)
_LAYOUT = {"cifar": (4, 1, 1, "ssa", "mlp"), "imagenet": (16, 1, 2, "attn", "fc")}


def _conv_bn(owner: nn.Module, name: str, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
    """Registers {name}_conv (no bias, 'same' padding) and {name}_bn on owner."""
    setattr(owner, f"{name}_conv", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False))
    setattr(owner, f"{name}_bn", nn.BatchNorm2d(cout))


def _maxpool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


class PatchEmbedInit(nn.Module):
    """The stem, widths in -> dim/2 -> dim, plus a 1×1 conv shortcut from the first spikes; output = sum of two
    spike tensors. "cifar": no down-sampling; "imagenet": /4 (max-pools after proj and proj1, a third conv proj2,
    a stride-2 shortcut)."""

    def __init__(self, in_channels: int, dim: int, layout: str) -> None:
        super().__init__()
        self.imagenet = layout == "imagenet"
        _conv_bn(self, "proj", in_channels, dim // 2, 3)
        if self.imagenet:
            self.proj_maxpool = _maxpool()
        self.proj_lif = lif()
        _conv_bn(self, "proj1", dim // 2, dim, 3)
        if self.imagenet:
            self.proj1_maxpool = _maxpool()
        self.proj1_lif = lif()
        if self.imagenet:
            _conv_bn(self, "proj2", dim, dim, 3)
            self.proj2_lif = lif()
        _conv_bn(self, "proj_res", dim // 2, dim, 1, stride=2 if self.imagenet else 1)
        self.proj_res_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = self.proj_bn(self.proj_conv(x.flatten(0, 1)))
        if self.imagenet:
            x = self.proj_maxpool(x)
        feat = self.proj_lif(split_tb4(x, T, B))  # spikes, the shortcut's input
        x = self.proj1_bn(self.proj1_conv(feat.flatten(0, 1)))
        if self.imagenet:
            x = self.proj1_maxpool(x)
        x = self.proj1_lif(split_tb4(x, T, B))
        if self.imagenet:
            x = self.proj2_lif(split_tb4(self.proj2_bn(self.proj2_conv(x.flatten(0, 1))), T, B))
        res = self.proj_res_lif(split_tb4(self.proj_res_bn(self.proj_res_conv(feat.flatten(0, 1))), T, B))
        return x + res


class PatchEmbeddingStage(nn.Module):
    """Down-sampling by 2 between stages, dim/2 -> dim: proj3 and proj4 convs (the max-pool after proj4 in the
    CIFAR file, after proj3 in the ImageNet file) beside a stride-2 1×1 conv shortcut of the stage input."""

    def __init__(self, dim: int, layout: str) -> None:
        super().__init__()
        self.pool_after = 3 if layout == "imagenet" else 4
        _conv_bn(self, "proj3", dim // 2, dim, 3)
        if self.pool_after == 3:
            self.proj3_maxpool = _maxpool()
        self.proj3_lif = lif()
        _conv_bn(self, "proj4", dim, dim, 3)
        if self.pool_after == 4:
            self.proj4_maxpool = _maxpool()
        self.proj4_lif = lif()
        _conv_bn(self, "proj_res", dim // 2, dim, 1, stride=2)
        self.proj_res_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        feat = x.flatten(0, 1)
        x = self.proj3_bn(self.proj3_conv(feat))
        if self.pool_after == 3:
            x = self.proj3_maxpool(x)
        x = self.proj3_lif(split_tb4(x, T, B))
        x = self.proj4_bn(self.proj4_conv(x.flatten(0, 1)))
        if self.pool_after == 4:
            x = self.proj4_maxpool(x)
        x = self.proj4_lif(split_tb4(x, T, B))
        res = self.proj_res_lif(split_tb4(self.proj_res_bn(self.proj_res_conv(feat)), T, B))
        return x + res


def _qkv_layers(owner: nn.Module, names: str, dim: int) -> None:
    for name in names:
        setattr(owner, f"{name}_conv", nn.Conv1d(dim, dim, kernel_size=1, stride=1, bias=False))
        setattr(owner, f"{name}_bn", nn.BatchNorm1d(dim))
        setattr(owner, f"{name}_lif", lif())


class Token_QK_Attention(nn.Module):  # noqa: N801 - the public class name
    """Q-K token attention: q, k = LIF(BN(Conv1d(x))); per head, a = LIF_0.5(sum of q over the head's channels)
    is a binary mask over tokens; y = a ⊙ k; out = LIF(BN(Conv1d(y))). No matmul."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        _qkv_layers(self, "qk", dim)
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1, stride=1)
        self.proj_bn = nn.BatchNorm1d(dim)
        self.proj_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        xf = x.flatten(3).flatten(0, 1)  # [T*B, C, N]
        h, d = self.num_heads, self.head_dim
        q = self.q_lif(split_tb3(self.q_bn(self.q_conv(xf)), T, B)).reshape(T, B, h, d, -1)
        k = self.k_lif(split_tb3(self.k_bn(self.k_conv(xf)), T, B)).reshape(T, B, h, d, -1)
        attn = self.attn_lif(q.sum(dim=3, keepdim=True))  # [T, B, h, 1, N]
        y = attn.mul(k).flatten(2, 3).flatten(0, 1)  # [T*B, C, N]
        y = self.proj_bn(self.proj_conv(y)).reshape(T, B, C, H, W)
        return self.proj_lif(y)


class Spiking_Self_Attention(nn.Module):  # noqa: N801 - the public class name
    """Spiking self-attention on the residual stream: q, k, v = LIF(BN(Conv1d(x))); y = LIF_0.5(q (kᵀ v) · 0.125);
    out = LIF(BN(Conv1d(y)))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 0.125
        _qkv_layers(self, "qkv", dim)
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1, stride=1)
        self.proj_bn = nn.BatchNorm1d(dim)
        self.proj_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        xf = x.flatten(3).flatten(0, 1)
        h, d = self.num_heads, self.head_dim
        q = split_heads(self.q_lif(split_tb3(self.q_bn(self.q_conv(xf)), T, B)), T, B, h, d)
        k = split_heads(self.k_lif(split_tb3(self.k_bn(self.k_conv(xf)), T, B)), T, B, h, d)
        v = split_heads(self.v_lif(split_tb3(self.v_bn(self.v_conv(xf)), T, B)), T, B, h, d)
        kv = k.transpose(-2, -1) @ v
        y = (q @ kv) * self.scale
        y = self.attn_lif(y.transpose(3, 4).reshape(T, B, C, -1))  # [T, B, C, N]
        y = self.proj_bn(self.proj_conv(y.flatten(0, 1))).reshape(T, B, C, H, W)
        return self.proj_lif(y)


class MLP(nn.Module):
    """LIF(BN(Conv2d 1×1)) dim -> hidden -> dim, post-neuron; layer names {prefix}1_*, {prefix}2_*."""

    def __init__(self, dim: int, hidden: int, prefix: str = "mlp") -> None:
        super().__init__()
        self.prefix = prefix
        for i, (cin, cout) in enumerate([(dim, hidden), (hidden, dim)], start=1):
            setattr(self, f"{prefix}{i}_conv", nn.Conv2d(cin, cout, kernel_size=1, stride=1))
            setattr(self, f"{prefix}{i}_bn", nn.BatchNorm2d(cout))
            setattr(self, f"{prefix}{i}_lif", lif())

    def _layer(self, i: int, x: torch.Tensor, T, B) -> torch.Tensor:
        conv, bn, neuron = (getattr(self, f"{self.prefix}{i}_{part}") for part in ("conv", "bn", "lif"))
        return neuron(split_tb4(bn(conv(x.flatten(0, 1))), T, B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        return self._layer(2, self._layer(1, x, T, B), T, B)


class TokenSpikingTransformer(nn.Module):
    """x + tssa(x), then + mlp(x) (stages 1 and 2)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, mlp_prefix: str) -> None:
        super().__init__()
        self.tssa = Token_QK_Attention(dim, num_heads)
        self.mlp = MLP(dim, hidden, mlp_prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.tssa(x)
        return x + self.mlp(x)


class SpikingTransformer(nn.Module):
    """x + attention(x), then + mlp(x) (stage 3); the attention is `ssa` (CIFAR file) or `attn` (ImageNet file)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, attn_name: str, mlp_prefix: str) -> None:
        super().__init__()
        self.attn_name = attn_name
        setattr(self, attn_name, Spiking_Self_Attention(dim, num_heads))
        self.mlp = MLP(dim, hidden, mlp_prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + getattr(self, self.attn_name)(x)
        return x + self.mlp(x)


def detect(state_dict: Mapping) -> dict | None:
    first, width, head = (shape_of(state_dict, k) for k in
                          ("patch_embed1.proj_conv.weight", "patch_embed3.proj4_conv.weight", "head.weight"))
    if None in (first, width, head) or shape_of(state_dict, "patch_embed2.proj3_conv.weight") is None:
        return None
    layout = "imagenet" if shape_of(state_dict, "patch_embed1.proj2_conv.weight") is not None else "cifar"
    _, s1, s2, _, prefix = _LAYOUT[layout]
    hidden = shape_of(state_dict, f"stage1.0.mlp.{prefix}1_conv.weight")
    if hidden is None:
        return None
    d = width[0]
    cfg = {"embed_dims": d, "depths": s1 + s2 + count_blocks(state_dict, "stage3."),
           "num_heads": guess_heads(d // 4), "mlp_ratios": mlp_ratio_from(hidden[0], d // 4),
           "num_classes": head[0], "in_channels": first[1], "layout": layout}
    if layout == "imagenet":  # the image size leaves no trace: the public ImageNet setting
        cfg.update(img_size=224, patch_size=16)
    return cfg


@register_model(
    ARCH, family="qkformer",
    default_cfg=dict(img_size=32, patch_size=4, in_channels=3, num_classes=10, embed_dims=384, num_heads=8,
                     mlp_ratios=4, depths=4, T=4, layout="cifar"),
    tiny_cfg=dict(img_size=16, embed_dims=64, num_heads=2, mlp_ratios=2, depths=3, T=2),
    input_shape=image_input_shape, detect=detect)
class QKFormer(nn.Module):
    """QKFormer-{depths}-{embed_dims} (default: the public CIFAR-10 4-384 config; ImageNet: layout="imagenet",
    img_size=224, patch_size=16, embed_dims=512 (or 384, 768), depths=10, num_classes=1000).

    Args:
        img_size: square input size; a multiple of the overall downsampling (4 for "cifar", 16 for "imagenet").
        patch_size: that downsampling (fixed by the layout; kept for the public configs).
        in_channels, num_classes: input channels and classes.
        embed_dims: width D of stage 3 (stages 1 and 2 have D/4 and D/2); a multiple of 8.
        num_heads: heads of every stage; must divide D/4.
        mlp_ratios: MLP expansion.
        depths: transformer blocks in all (stage 3 has depths-2 ("cifar") or depths-3 ("imagenet")).
        T: time steps.
        input_mode: "static" repeats a [B, C, H, W] input T times; "events" takes [B, T, C, H, W] frames.
        layout: "cifar" (cifar10/model.py) or "imagenet" (imagenet/qkformer.py), see the module docstring.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 embed_dims: int = 384, num_heads: int = 8, mlp_ratios: float = 4, depths: int = 4, T: int = 4,
                 input_mode: str = "static", layout: str = "cifar") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ModelError(f"Model '{ARCH}' needs layout to be one of {', '.join(LAYOUTS)}, got {layout!r}.")
        downsample, s1, s2, attn_name, prefix = _LAYOUT[layout]
        check_transformer_dims(ARCH, embed_dims, num_heads, mlp_ratios, depths, T, num_classes, in_channels)
        check_int(ARCH, "depths", depths, minimum=s1 + s2)
        if (embed_dims // 4) % num_heads:
            raise ModelError(f"Model '{ARCH}' needs num_heads ({num_heads}) to divide the stage-1 width "
                             f"embed_dims/4 ({embed_dims // 4}).")
        check_patch_size(ARCH, patch_size, downsample)
        check_image_size(ARCH, img_size, downsample)
        self.T = T
        self.input_mode = check_input_mode(ARCH, input_mode)
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.depths = depths
        self.num_patches = (img_size // downsample) ** 2
        self.input_shape = image_input_shape(dict(in_channels=in_channels, img_size=img_size, T=T,
                                                  input_mode=input_mode))
        d1, d2, d3 = embed_dims // 4, embed_dims // 2, embed_dims

        def hidden(d: int) -> int:
            return int(d * mlp_ratios)

        # the public registration order: the three embeddings, then the three stages
        self.patch_embed1 = PatchEmbedInit(in_channels, d1, layout)
        self.patch_embed2 = PatchEmbeddingStage(d2, layout)
        self.patch_embed3 = PatchEmbeddingStage(d3, layout)
        self.stage1 = nn.ModuleList([TokenSpikingTransformer(d1, num_heads, hidden(d1), prefix) for _ in range(s1)])
        self.stage2 = nn.ModuleList([TokenSpikingTransformer(d2, num_heads, hidden(d2), prefix) for _ in range(s2)])
        self.stage3 = nn.ModuleList([SpikingTransformer(d3, num_heads, hidden(d3), attn_name, prefix)
                                     for _ in range(depths - s1 - s2)])
        self.head = nn.Linear(d3, num_classes)
        self.apply(init_linear_trunc_normal)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[T, B, C, H, W] -> residual stream averaged over tokens, [T, B, D]."""
        x = self.patch_embed1(x)
        for blk in self.stage1:
            x = blk(x)
        x = self.patch_embed2(x)
        for blk in self.stage2:
            x = blk(x)
        x = self.patch_embed3(x)
        for blk in self.stage3:
            x = blk(x)
        return x.flatten(3).mean(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(time_first_image(x, self.T, self.input_mode))
        return self.head(x.mean(0))
