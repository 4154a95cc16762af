"""ChannelsLastConvs (passes/channels_last.py): binary Conv2d train channels-last where the model runs so — the
tokenizer's activations are channels-last in training, a training step gives the NCHW step's logits and
gradients, a model whose code needs NCHW (a `view` merging C, H, W) keeps NCHW with a note, the recipe switch
turns it off, evaluation keeps NCHW."""
from __future__ import annotations

import copy

import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.nn.binary import BinaryConv2d
from bestcompress.nn.lif import LIF
from bestcompress.zoo import create_model

CL = torch.channels_last


def _spikformer():
    torch.manual_seed(0)
    return create_model("spikformer_cifar", num_classes=10, img_size=16, embed_dims=32, num_heads=2, depths=1, T=2)


def _flags(model) -> list:
    return [getattr(m, "channels_last", None) for m in model.modules() if isinstance(m, BinaryConv2d)]


def _step(model, x, flags: bool):
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            m.channels_last = flags
    layouts = []
    hooks = [m.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=CL)))
             for m in model.modules() if isinstance(m, BinaryConv2d)]
    model.train().zero_grad(set_to_none=True)
    out = model(x)
    out = out[0] + out[1] if isinstance(out, tuple) else out
    out.square().mean().backward()
    for h in hooks:
        h.remove()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, layouts


def test_binary_convs_train_channels_last_with_the_nchw_results():
    student = binarize(_spikformer().eval(), "bestformer").model
    assert _flags(student) and all(_flags(student))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    state = copy.deepcopy(student.state_dict())
    y, g, layouts = _step(student, x, True)
    assert layouts and all(layouts)  # every binary convolution's output is channels-last
    student.load_state_dict(state)
    y0, g0, layouts0 = _step(student, x, False)
    assert not any(layouts0)
    assert torch.allclose(y, y0, rtol=1e-5, atol=1e-6)
    assert g.keys() == g0.keys()
    for k in g:
        assert torch.allclose(g[k], g0[k], rtol=1e-4, atol=1e-6), k


def test_evaluation_keeps_nchw():
    student = binarize(_spikformer().eval(), "bestformer").model.eval()
    layouts = []
    for m in student.modules():
        if isinstance(m, BinaryConv2d):
            m.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous()))
    with torch.no_grad():
        student(torch.rand(2, 3, 16, 16))
    assert layouts and all(layouts)


class _ViewsNCHW(nn.Module):
    """Code that needs NCHW memory: `view` merges C, H and W (raises on a channels-last tensor)."""

    def __init__(self, T: int = 2) -> None:
        super().__init__()
        self.T = T
        self.conv0, self.bn0, self.lif0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), LIF()
        self.conv1, self.bn1, self.lif1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), LIF()
        self.head = nn.Linear(8 * 8 * 8, 4)
        self.bc_input_shape = (3, 8, 8)

    def forward(self, x):
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        T, B = x.shape[:2]
        s = self.lif0(self.bn0(self.conv0(x.flatten(0, 1))).reshape(T, B, 8, 8, 8))
        s = self.lif1(self.bn1(self.conv1(s.flatten(0, 1))).reshape(T, B, 8, 8, 8))
        return self.head(s.view(T, B, -1)).mean(0)


def test_a_model_that_needs_nchw_keeps_it_and_says_why():
    torch.manual_seed(0)
    result = binarize(_ViewsNCHW().eval(), "bestformer", overrides={"reversible.enabled": False})
    assert _flags(result.model) == [False]
    assert any("channels-last convolutions: off" in n and "view" in n for n in result.notes)
    out = result.model.train()(torch.rand(2, 3, 8, 8))  # trains as before
    out.sum().backward()


def test_the_recipe_switch_turns_it_off():
    student = binarize(_spikformer().eval(), "bestformer", overrides={"weights.channels_last": False}).model
    assert _flags(student) and not any(_flags(student))
