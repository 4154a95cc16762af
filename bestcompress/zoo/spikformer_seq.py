"""Spikformer for 1-D signals (e.g. MNIST-1D: 1 channel × 40 samples): this package's own model, no public
checkpoint. It follows the Spikformer CIFAR recipe (ZK-Zhou/spikformer cifar10/model.py) with the tokenizer
made 1-D: Conv1d(k=3)+BN1d+LIF stages over the sequence with no pooling (one token per sample point) and a
relative-position Conv1d+BN1d+LIF added to its input; then the Spikformer CIFAR blocks unchanged (Linear+BN1d+
LIF q/k/v, N×N attention (q @ kᵀ)·0.125 then @ v, LIF_0.5, Linear projection; Linear MLP), without the
unused LayerNorms; mean over tokens and T, Linear head. The default (~120 k parameters) trains on a CPU in
minutes.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bestcompress.zoo._common import (
    check_input_mode, check_int, check_transformer_dims, infer_sizes, init_linear_trunc_normal, lif,
    sequence_input_shape, split_tb3, time_first_sequence,
)
from bestcompress.zoo.registry import register_model
from bestcompress.zoo.spikformer_cifar import Block

ARCH = "spikformer_seq"


class SeqTokenizer(nn.Module):
    """Conv1d(k=3)+BN1d+LIF stages C -> D/4 -> D/2 -> D over the sequence, then x + LIF(BN(rpe_conv(x))).
    [T, B, C, L] -> [T, B, L, D] (one token per sample point)."""

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        widths = [in_channels, embed_dims // 4, embed_dims // 2, embed_dims]
        for i, suffix in enumerate(["", "1", "2"]):
            setattr(self, f"proj_conv{suffix}", nn.Conv1d(widths[i], widths[i + 1], 3, 1, 1, bias=False))
            setattr(self, f"proj_bn{suffix}", nn.BatchNorm1d(widths[i + 1]))
            setattr(self, f"proj_lif{suffix}", lif())
        self.rpe_conv = nn.Conv1d(embed_dims, embed_dims, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm1d(embed_dims)
        self.rpe_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, L = x.shape
        x = self.proj_lif(split_tb3(self.proj_bn(self.proj_conv(x.flatten(0, 1))), T, B))
        x = self.proj_lif1(split_tb3(self.proj_bn1(self.proj_conv1(x.flatten(0, 1))), T, B))
        x = self.proj_lif2(split_tb3(self.proj_bn2(self.proj_conv2(x.flatten(0, 1))), T, B))
        x = x + self.rpe_lif(split_tb3(self.rpe_bn(self.rpe_conv(x.flatten(0, 1))), T, B))
        return x.transpose(-1, -2)  # [T, B, L, D]


def detect(state_dict: Mapping) -> dict | None:
    return infer_sizes(state_dict, first_conv="patch_embed.proj_conv.weight", width="patch_embed.rpe_conv.weight",
                       mlp_in="block.0.mlp.fc1_linear.weight", markers=("block.0.attn.q_linear.weight",),
                       default_heads=4)


@register_model(
    ARCH, family="spikformer",
    default_cfg=dict(seq_len=40, in_channels=1, num_classes=10, embed_dims=64, num_heads=4, mlp_ratios=4,
                     depths=2, T=4),
    tiny_cfg=dict(seq_len=20, embed_dims=32, num_heads=2, depths=1, T=2),
    input_shape=sequence_input_shape, detect=detect)
class SpikformerSeq(nn.Module):
    """Spikformer for [B, C, L] signals.

    Args:
        seq_len: sequence length L (= number of tokens).
        in_channels, num_classes: input channels and classes.
        embed_dims, num_heads, mlp_ratios, depths: transformer width, heads, MLP expansion and depth.
        T: time steps.
        input_mode: "static" repeats a [B, C, L] input T times; "events" takes [B, T, C, L] frames.
    """

    def __init__(self, seq_len: int = 40, in_channels: int = 1, num_classes: int = 10, embed_dims: int = 64,
                 num_heads: int = 4, mlp_ratios: float = 4, depths: int = 2, T: int = 4,
                 input_mode: str = "static") -> None:
        super().__init__()
        hidden = check_transformer_dims(ARCH, embed_dims, num_heads, mlp_ratios, depths, T, num_classes,
                                        in_channels, dims_multiple=4)
        check_int(ARCH, "seq_len", seq_len)
        self.T = T
        self.input_mode = check_input_mode(ARCH, input_mode)
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_patches = seq_len
        self.input_shape = sequence_input_shape(dict(in_channels=in_channels, seq_len=seq_len, T=T,
                                                     input_mode=input_mode))
        self.patch_embed = SeqTokenizer(in_channels, embed_dims)
        self.block = nn.ModuleList([Block(embed_dims, num_heads, hidden, unused_norms=False)
                                    for _ in range(depths)])
        self.head = nn.Linear(embed_dims, num_classes)
        self.apply(init_linear_trunc_normal)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[T, B, C, L] -> residual stream averaged over tokens, [T, B, D]."""
        x = self.patch_embed(x)
        for blk in self.block:
            x = blk(x)
        return x.mean(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(time_first_sequence(x, self.T, self.input_mode))
        return self.head(x.mean(0))
