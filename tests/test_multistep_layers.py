"""multistep_layers.py: a Conv subclass that takes [T, B, C, H, W] (as SNN libraries' multi-step layers do) is
traced as flatten -> its plain parent -> reshape, with equal outputs and gradients, and then binarized; layers that
take a plain batch, or compute something else on [T, B, ...], are left alone."""
from __future__ import annotations

import torch
from torch import nn

from bestcompress.multistep_layers import fold_multistep_convs
from bestcompress.passes.base import PassContext
from bestcompress.passes.tracing import TraceModel


class SeqConv2d(nn.Conv2d):
    """A multi-step convolution in the style of SNN libraries: refuses [B, C, H, W]."""

    def forward(self, x):
        if x.dim() != 5:
            raise ValueError(f"expected [T, B, C, H, W], got {tuple(x.shape)}")
        return super().forward(x.flatten(0, 1)).reshape(x.shape[0], x.shape[1], self.out_channels,
                                                        *super().forward(x[0]).shape[2:])


class Conv3x3(SeqConv2d):  # how public code subclasses it again
    def __init__(self, cin, cout, stride=1):
        super().__init__(cin, cout, 3, stride=stride, padding=1, bias=False)


class Scaled(SeqConv2d):
    def forward(self, x):
        return super().forward(x) * 2


class Net(nn.Module):
    def __init__(self, last: type = Conv3x3) -> None:
        super().__init__()
        self.a = Conv3x3(3, 4, stride=2)
        self.b = last(4, 4) if last is not Scaled else Scaled(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):  # [T, B, C, H, W]
        y = torch.relu(self.a(x))
        y = self.b(y) + y
        y = self.b(y) + y  # one module called twice: every call is rewritten
        return self.head(y.mean((0, 3, 4)))


def test_multi_step_convs_become_their_plain_parent_on_the_folded_axes():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 3, 8, 8)  # T=2, B=3
    ctx = PassContext(example_input=x)
    traced = TraceModel(ctx).apply(model)
    assert type(traced.a) is nn.Conv2d and type(traced.b) is nn.Conv2d
    assert traced.a.weight is model.a.weight and traced.a.stride == (2, 2)
    assert any("2 multi-step convolution(s)" in n for n in ctx.notes)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), traced(xb)
    assert torch.allclose(ya, yb, atol=1e-6)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)
    assert torch.allclose(traced(torch.ones(3, 1, 3, 8, 8)), model(torch.ones(3, 1, 3, 8, 8)), atol=1e-6)  # T, B
    assert set(traced.state_dict()) == set(model.state_dict())


def test_layers_that_take_a_plain_batch_or_compute_otherwise_are_left_alone():
    class Plainish(nn.Conv2d):  # takes [B, C, H, W]: the subclass check of BinarizeWeights decides
        pass

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = Plainish(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    x = torch.randn(2, 2, 3, 8, 8)
    traced = TraceModel(PassContext(example_input=x)).apply(Net(Scaled))
    assert type(traced.a) is nn.Conv2d and type(traced.b) is Scaled  # Scaled doubles: not its parent
    ref = Net(Scaled)
    ref.load_state_dict(traced.state_dict())
    assert torch.allclose(traced(x), ref(x), atol=1e-6)
    flat = TraceModel(PassContext(example_input=torch.randn(2, 3, 8, 8))).apply(Flat())
    assert type(flat.conv) is Plainish and fold_multistep_convs(flat) == []


def test_the_binarizer_makes_them_1_bit():
    import bestcompress as bc
    from bestcompress.nn.binary import is_binary_layer

    torch.manual_seed(0)
    model = Net()
    x = torch.rand(2, 2, 3, 8, 8)
    out = bc.binarize(model, recipe="identity", input_shape=(2, 3, 8, 8), overrides={"weights": {"binarize": True}})
    binary = out.model if hasattr(out, "model") else out
    assert is_binary_layer(binary.get_submodule("b"))
    assert binary(x).shape == (2, 5)
