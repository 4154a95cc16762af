"""ChannelsLastConvs: binary 2-d convolutions train on channels-last memory on CPU, where the model runs so.

A channels-last output is the same values in another memory order, but code after a convolution can depend on the
order: `x.view(B, -1)` on an [N, C, H, W] tensor stored channels-last raises. The pass therefore sets
`channels_last` on every BinaryConv2d and runs the model once (evaluation mode, no gradients, on the example
input, with the flagged layers converting as in training: nn/channels_last.everywhere); if that run raises or
returns outputs of other shapes, every flag is cleared again and a note says why. Recipe switch:
`weights.channels_last` (on by default; false keeps NCHW); it runs only where `weights.binarize` is on.

Ensures: each BinaryConv2d has `channels_last` set, all True (the probe ran) or all False.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import short_reason
from ..nn.binary import BinaryConv2d
from ..nn.channels_last import everywhere
from .base import Pass, PassError, register_pass


def _run(model: nn.Module, x) -> list:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return [tuple(t.shape) for t in pytree.tree_leaves(model(x)) if isinstance(t, torch.Tensor)]
    finally:
        for m, mode in modes.items():
            m.training = mode


@register_pass
class ChannelsLastConvs(Pass):
    switch = "weights.channels_last"

    @classmethod
    def enabled(cls, recipe) -> bool:
        return recipe is None or bool(recipe.weights.binarize and recipe.weights.channels_last)

    def apply(self, model: nn.Module) -> nn.Module:
        convs = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
        x = self.ctx.example_input
        for m in convs:
            m.channels_last = False
        if not convs or x is None:
            return model
        try:
            plain = _run(model, x)
            for m in convs:
                m.channels_last = True
            with everywhere():
                flagged = _run(model, x)
            if flagged != plain:
                raise ValueError(f"outputs of shapes {flagged} instead of {plain}")
        except Exception as e:  # noqa: BLE001 - the model's own code refusing the layout is the answer
            for m in convs:
                m.channels_last = False
            self.ctx.note(f"channels-last convolutions: off (the model did not run on channels-last tensors: "
                          f"{type(e).__name__}: {short_reason(e)})")
            return model
        self.ctx.note(f"channels-last convolutions: {len(convs)} binary Conv2d train on channels-last memory on CPU")
        return model

    def check(self, model: nn.Module) -> None:
        flags = {getattr(m, "channels_last", None) for m in model.modules() if isinstance(m, BinaryConv2d)}
        if None in flags or len(flags) > 1:
            raise PassError("binary Conv2d layers were left with mixed or missing channels_last flags")
