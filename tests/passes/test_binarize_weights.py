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


# -------------------------------------------------------------------------- subclasses of Conv/Linear layers

class NamedConv2d(nn.Conv2d):
    """A subclass that only adds a helper (as model code often does): computes as Conv2d."""

    def extra_repr(self):
        return "named " + super().extra_repr()

    def forward(self, x):
        return self._conv_forward(x, self.weight, self.bias)


class SignConv2d(nn.Conv2d):
    """An IR-Net-style conv that binarizes inside its own forward: computes something else than Conv2d."""

    def forward(self, x):
        return nn.functional.conv2d(x, torch.sign(self.weight), self.bias, self.stride, self.padding)


class ScaledLinear(nn.Linear):
    def __init__(self, *args, scale=2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


class SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.named = NamedConv2d(4, 4, 3, padding=1)
        self.sign = SignConv2d(4, 4, 3, padding=1)
        self.same_linear = ScaledLinear(4, 4, scale=1.0)  # scale 1: computes as Linear
        self.scaled = ScaledLinear(4, 4)
        self.head = nn.Linear(4, 3)
        self.lif = LIF()

    def forward(self, x):  # [B, 3, 6, 6]
        s = self.lif(self.stem(x).unsqueeze(0)).squeeze(0)
        y = self.sign(self.named(s)).mean((2, 3))
        return self.head(self.scaled(self.same_linear(y)))


def test_subclasses_that_compute_as_their_parent_are_binarized_the_others_named_in_a_note():
    torch.manual_seed(0)
    model = SubclassNet().eval()
    x = torch.rand(2, 3, 6, 6)
    out, p, notes = _run(model, x)
    assert isinstance(out.named, BinaryConv2d) and isinstance(out.same_linear, BinaryLinear)
    assert torch.equal(out.named.weight, model.named.weight)  # same parameters, now binarized
    assert type(out.sign) is SignConv2d and type(out.scaled) is ScaledLinear  # computes otherwise: kept
    assert set(p.refused) == {"sign", "scaled"}
    assert any("'sign'" in n and "SignConv2d subclasses Conv2d" in n and "computes something else" in n
               for n in notes)
    kept_note = next(n for n in notes if "kept full precision by the recipe" in n)
    assert "sign" not in kept_note and "scaled" not in kept_note  # the recipe did not keep them
    calls = [n.target for n in out.graph.nodes if n.op == "call_module"]
    assert "named" in calls and "sign" in calls  # subclasses are leaves the graph calls, not inlined convs
    assert out(x).shape == (2, 3)


def test_when_only_refused_subclasses_remain_the_error_does_not_blame_the_recipe():
    model = nn.Sequential(nn.Linear(4, 4), ScaledLinear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ModelError, match="compute differently from their parent class"):
        _run(model, torch.rand(2, 4))


def test_a_parametrized_layer_binarizes_with_the_weight_it_computes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
    x = torch.rand(2, 4)
    weight = model[1].weight.detach().clone()  # computed from weight_g and weight_v
    out, p, notes = _run(model, x)
    assert isinstance(out.get_submodule("1"), BinaryLinear) and not p.refused
    assert torch.allclose(out.get_submodule("1").weight, weight)
    assert any("1 subclassed layer(s) binarized after checking" in n for n in notes)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return torch.sign(w)

    @staticmethod
    def backward(ctx, g):
        return g


class StandardizedSignConv1d(nn.Conv1d):
    """Binary code written by hand (as public BESTformer code does): centre and scale each output channel's
    weights, take their sign with a straight-through gradient, convolve. Already the binary layer."""

    def forward(self, x):
        flat = self.weight.view(self.weight.size(0), -1)
        w = (flat - flat.mean(-1, keepdim=True)) / flat.std(-1, keepdim=True)
        return nn.functional.conv1d(x, _SignSTE.apply(w).view_as(self.weight), self.bias, self.stride,
                                    self.padding, self.dilation, self.groups)


def test_a_subclass_that_already_computes_the_binary_layer_is_swapped_for_it_with_a_note():
    from bestcompress.nn.binary import BinaryConv1d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv1d(2, 8, 1)
            self.ir = StandardizedSignConv1d(8, 8, 1, bias=False)
            self.plain_sign = SignConv2d(8, 8, 1)  # sign without standardizing: not the binary layer, kept
            self.head = nn.Linear(8, 3)
            self.lif = LIF()

        def forward(self, x):  # [B, 2, L]
            s = self.lif(self.stem(x).unsqueeze(0)).squeeze(0)
            y = self.lif(self.ir(s).unsqueeze(0)).squeeze(0)
            return self.head(self.plain_sign(y.unsqueeze(-1)).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.rand(2, 2, 5)
    out, p, notes = _run(model, x)
    assert isinstance(out.ir, BinaryConv1d) and "ir" in p.already_binary
    assert type(out.plain_sign) is SignConv2d and set(p.refused) == {"plain_sign"}
    assert any("already compute 1-bit" in n and "ir" in n for n in notes)
    with torch.no_grad():
        s = torch.rand(3, 8, 5).round()
        assert torch.allclose(out.ir(s), model.ir(s), atol=1e-5)  # same function as the hand-written code
