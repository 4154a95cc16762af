"""BinarizeWeights: every Conv/Linear becomes binary except the kept ones; idempotent; errors are clear."""
import pytest
import torch
from torch import nn

from bestcompress.errors import ModelError
from bestcompress.nn.binary import BinaryConv2d, BinaryLinear, is_binary_layer
from bestcompress.nn.lif import LIF
from bestcompress.passes import BinarizeWeights, PassContext, Pipeline
from bestcompress.passes.binarize_weights import resolve_keep_fp
from bestcompress.trace import trace_model


class LateFirst(nn.Module):
    """The first conv called is defined last: 'first' must follow call order, not definition order."""

    def __init__(self):
        super().__init__()
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 3)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.lif = LIF()

    def forward(self, x):  # [B, 3, 6, 6]
        s = self.lif(self.stem(x).unsqueeze(0)).squeeze(0)
        y = self.mid(s).mean((2, 3))
        return self.classifier(self.fc(y))


def _run(model, x, **kw):
    ctx = PassContext(example_input=x)
    p = BinarizeWeights(ctx, **kw)
    traced, _ = trace_model(model)
    out = Pipeline([p]).apply(traced)
    return out, p, ctx.notes


def test_all_but_first_and_head_are_binary_and_kept_ones_untouched():
    torch.manual_seed(0)
    model = LateFirst()
    x = torch.rand(2, 3, 6, 6)
    stem_w, cls_w = model.stem.weight.clone(), model.classifier.weight.clone()
    out, p, notes = _run(model, x)
    assert p.kept == {"stem", "classifier"}  # call order, and the last layer called is the head
    assert type(out.stem) is nn.Conv2d and torch.equal(out.stem.weight, stem_w)
    assert type(out.classifier) is nn.Linear and torch.equal(out.classifier.weight, cls_w)
    assert isinstance(out.mid, BinaryConv2d) and isinstance(out.fc, BinaryLinear)
    assert out(x).shape == (2, 3)
    assert any("2 layers binarized" in n for n in notes)


def test_keep_patterns_and_named_heads():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model.add_module("head_a", nn.Linear(4, 2))
    x = torch.rand(2, 4)
    assert resolve_keep_fp(model, ("heads",), x) == {"head_a"}
    assert resolve_keep_fp(model, ("first", "1"), x) == {"0", "1"}
    out, p, _ = _run(model, x, keep_full_precision=("head*",))
    assert [type(m) for m in out.children()] == [BinaryLinear, BinaryLinear, BinaryLinear, nn.Linear]


def test_scaled_option_gives_channel_scaled_weights():
    torch.manual_seed(0)
    out, _, _ = _run(LateFirst(), torch.rand(2, 3, 6, 6), scaled=True)
    wb = out.mid.binary_weight()
    for c in range(wb.shape[0]):
        values = wb[c].unique()
        assert len(values) == 2 and torch.allclose(values[0], -values[1]) and values[1] != 1.0


def test_idempotent():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 6)
    once, _, _ = _run(LateFirst(), x)
    y = once(x)
    layers = {n: type(m) for n, m in once.named_modules()}
    ctx = PassContext(example_input=x)
    p = BinarizeWeights(ctx)
    twice = Pipeline([p]).apply(once)
    assert {n: type(m) for n, m in twice.named_modules()} == layers
    assert p.swapped == [] and p.kept == {"stem", "classifier"}
    assert torch.equal(twice(x), y)


def test_errors_name_the_problem():
    with pytest.raises(ModelError, match="no Conv1d, Conv2d or Linear"):
        BinarizeWeights().apply(nn.Sequential(nn.ReLU()))
    with pytest.raises(ModelError, match="keep_full_precision"):
        BinarizeWeights(keep_full_precision=("*",)).apply(nn.Sequential(nn.Linear(2, 2)))


def test_binary_layers_are_found_by_is_binary_layer_after_the_pass():
    torch.manual_seed(0)
    out, p, _ = _run(LateFirst(), torch.rand(2, 3, 6, 6))
    assert sorted(n for n, m in out.named_modules() if is_binary_layer(m)) == sorted(p.swapped) == ["fc", "mid"]
