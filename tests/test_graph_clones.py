"""graph_clones.py: `skip = x.clone(); ...; out + skip` becomes the residual x + F(x) the trunk finds, with equal
outputs and gradients; a graph that writes in place keeps its clones."""
from __future__ import annotations

import torch
from torch import fx, nn

from bestcompress.graph_clones import drop_redundant_clones
from bestcompress.passes.base import PassContext
from bestcompress.passes.tracing import TraceModel
from bestcompress.trunk import GraphIndex, is_add


class CloneSkip(nn.Module):
    """A block in the style of public multi-step code: copy the input, transform, add the copy back."""

    def __init__(self, dim: int, inplace: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        x_feat = x.clone()
        x = self.fc2(self.act(self.fc1(x)))
        return x + x_feat


class TwoBlocks(nn.Module):
    def __init__(self, dim: int = 8, inplace: bool = False, writes: bool = False) -> None:
        super().__init__()
        self.blocks = nn.Sequential(CloneSkip(dim, inplace), CloneSkip(dim))
        self.head = nn.Linear(dim, 3)
        self.writes = writes

    def forward(self, x):
        x = self.blocks(x)
        if self.writes:
            x.mul_(0.5)
        return self.head(x.mean(1))


def _clones(gm: fx.GraphModule) -> int:
    return sum(n.target == "clone" or n.target is torch.clone for n in gm.graph.nodes)


def _residuals(gm: fx.GraphModule) -> int:
    idx = GraphIndex(gm)
    return sum(idx.residual(n) is not None for n in gm.graph.nodes if is_add(n))


def test_clones_become_their_inputs_so_the_residual_adds_are_found_with_equal_outputs_and_gradients():
    torch.manual_seed(0)
    model = TwoBlocks()
    x = torch.randn(2, 5, 8)
    plain = fx.symbolic_trace(model)
    assert _clones(plain) == 2 and _residuals(plain) == 0  # what the trunk saw before
    ctx = PassContext(example_input=x)
    traced = TraceModel(ctx).apply(model)
    assert _clones(traced) == 0 and _residuals(traced) == 2
    assert any("2 clone(s) replaced" in n for n in ctx.notes)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), traced(xb)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(xa.grad, xb.grad)


def test_a_graph_that_writes_in_place_keeps_its_clones():
    x = torch.randn(2, 5, 8)
    for model in (TwoBlocks(inplace=True), TwoBlocks(writes=True)):
        gm = fx.symbolic_trace(model)
        assert drop_redundant_clones(gm) == 0 and _clones(gm) == 2
        assert torch.equal(gm(x), model(x))
