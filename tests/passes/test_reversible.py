"""InsertReversibleCouplings: the documented two-stream equations (paper and function-preserving forms), the
inverse, every residual topology (stages, two heads, extra outputs), idempotence and clear errors."""
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from bestcompress.convert import binarize
from bestcompress.model_facts import example_input_for
from bestcompress.errors import ModelError, RecipeError
from bestcompress.nn.calibrate import make_it_fire
from bestcompress.nn.lif import LIF
from bestcompress.nn.reversible import DualHeadOutput, ReversibleCoupling, reconstruct_previous
from bestcompress.passes.base import PassContext, Pipeline
from bestcompress.passes.reversible import (
    InsertReversibleCouplings, coupling_nodes, find_stages, find_trunk, reconstruct_streams, subblock_functions,
)
from bestcompress.passes.shapes import record_calls
from bestcompress.summary import summarize
from bestcompress.trace import trace_model
from bestcompress.zoo import list_models, tiny_model
from bestcompress.zoo._common import time_first_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from topology_models import Hierarchical, LogitsAndNone, TwoHeaded, example  # noqa: E402

# the ops between the residual stream and the head, per family (written out by hand for the reference)
POOL = {
    "spikformer_cifar": lambda z: z.mean(2).mean(0),
    "spikingformer": lambda z: z.flatten(3).mean(3).mean(0),
}


def _coupled(name, dtype=torch.float64, form="paper", eval_heads="mean", fire=False, **kw):
    torch.manual_seed(0)
    model = tiny_model(name, **kw)
    if fire:  # a fresh model of this family is silent: every stream would be 0
        make_it_fire(model, example_input_for(model, batch=1).shape[1:])
    model = model.to(dtype)
    gm, _ = trace_model(model)  # gm shares its leaf modules with `model`
    ctx = PassContext()
    gm = Pipeline([InsertReversibleCouplings(ctx, form=form, eval_heads=eval_heads)]).apply(gm)
    x = example_input_for(model, batch=3).to(dtype)
    return model, gm, x, ctx


def _reference(model, gm, x, name):
    """z_1 = A_1(z_0) + z_0; z_k = F_k(z_{k-1}) + ½(z_{k-2} + z_{k-1}); head(z_{K-1}), head2(z_K)."""
    z = [model.patch_embed(time_first_image(x, model.T, "static"))]
    subs = [m for blk in model.block for m in (blk.attn, blk.mlp)]
    for k, F in enumerate(subs, start=1):
        f = F(z[k - 1])
        z.append(f + z[0] if k == 1 else f + 0.5 * (z[k - 2] + z[k - 1]))
    pool = POOL[name]
    return model.head(pool(z[-2])), gm.head2(pool(z[-1]))


@pytest.mark.parametrize("name", sorted(POOL))
def test_coupled_forward_matches_two_stream_equations(name):
    model, gm, x, ctx = _coupled(name)
    assert any("couplings" in n for n in ctx.notes)
    assert torch.equal(gm.head2.weight, gm.head.weight) and gm.head2 is not gm.head
    for training in (True, False):
        model.train(training)
        gm.train(training)
        with torch.no_grad():
            head, head2 = _reference(model, gm, x, name)
            out = gm(x)
        if training:
            assert isinstance(out, tuple) and len(out) == 2
            torch.testing.assert_close(out[0], head, atol=1e-6, rtol=0)
            torch.testing.assert_close(out[1], head2, atol=1e-6, rtol=0)
            assert not torch.allclose(out[0], out[1])  # the heads read different streams
        else:
            torch.testing.assert_close(out, (head + head2) / 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(POOL))
def test_inverse_reconstructs_previous_stream(name):
    model, gm, x, _ = _coupled(name)
    gm.eval()
    seen = []  # (z_{k-2}, z_{k-1}, z_k) at every coupling
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod.index, args[1], args[2], out)))
             for m in gm.modules() if isinstance(m, ReversibleCoupling)]
    with torch.no_grad():
        gm(x)
        fs = subblock_functions(gm)
        assert len(fs) == 2 * len(model.block)
        for k, z_km2, z_km1, z_k in seen:
            rec = reconstruct_previous(z_k, z_km1, fs[k - 1](z_km1))
            assert (rec - z_km2).abs().max().item() < 1e-4
        # the whole trunk from its last two streams alone
        seen.sort(key=lambda t: t[0])
        streams = reconstruct_streams(gm, seen[-1][3], seen[-1][2])
        expected = [seen[0][1], seen[0][2]] + [t[3] for t in seen]
        assert len(streams) == len(expected)
        for got, want in zip(streams, expected):
            assert (got - want).abs().max().item() < 1e-4
    for h in hooks:
        h.remove()


def test_idempotent_and_check():
    model, gm, x, _ = _coupled("spikformer_cifar", dtype=torch.float32, form="preserving")
    code, n_modules = gm.code, len(list(gm.modules()))
    ctx = PassContext()
    p = InsertReversibleCouplings(ctx)
    gm2 = p.apply(gm)
    p.check(gm2)
    assert gm2 is gm and gm.code == code and len(list(gm.modules())) == n_modules
    assert "already" in ctx.notes[0]
    assert [gm.get_submodule(n.target).index for n in coupling_nodes(gm)] == [2, 3, 4]
    assert [gm.get_submodule(n.target).kind for n in coupling_nodes(gm)] == ["mlp", "attention", "mlp"]


def test_eval_heads_option():
    d = DualHeadOutput("head2").eval()
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(d(a, b), b)
    assert torch.equal(DualHeadOutput("head").eval()(a, b), a)
    assert torch.equal(DualHeadOutput().eval()(a, b), torch.full((2, 3), 0.5))
    assert DualHeadOutput().train()(a, b) == (a, b)
    r = binarize(tiny_model("spikformer_seq"), "bestformer", overrides={"reversible.eval_heads": "head"})
    duals = [m for m in r.model.modules() if isinstance(m, DualHeadOutput)]
    assert len(duals) == 1 and duals[0].eval_heads == "head"
    with pytest.raises(ModelError):
        InsertReversibleCouplings(eval_heads="both")


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.fc = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.lif = LIF()

    def forward(self, x):
        x = x + self.lif(self.q(x) @ self.k(x).transpose(-1, -2) @ self.v(x))
        return x + self.lif(self.fc(x))


class _TokenResidualNet(nn.Module):
    """A user model whose tokenizer residual feeds the first block directly (no reshape in between)."""

    def __init__(self, d=8, depth=2):
        super().__init__()
        self.embed, self.rpe, self.lif = nn.Linear(4, d), nn.Linear(d, d), LIF()
        self.blocks = nn.ModuleList([_Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # [B, N, 4]
        x = self.embed(x)
        x = x + self.lif(self.rpe(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


def test_tokenizer_residual_and_flat_blocks_are_found():
    torch.manual_seed(0)
    net = _TokenResidualNet()
    gm, _ = trace_model(net)
    trunk = find_trunk(gm)
    assert [b.attention for b in trunk.blocks] == [True, False, True, False]
    assert [b.where for b in trunk.blocks] == ["blocks.0", "blocks.0", "blocks.1", "blocks.1"]
    assert len(trunk.skipped) == 1  # the tokenizer's x + rpe(x)
    ctx = PassContext()
    gm = InsertReversibleCouplings(ctx).apply(gm)
    assert "is not part of the trunk" in ctx.notes[0]
    gm.train()
    out = gm(torch.rand(2, 5, 4))
    assert isinstance(out, tuple) and out[0].shape == (2, 3)


def test_merged_subblocks_sdt_inner_residual():
    model, gm, x, _ = _coupled("sdt_v1", mlp_ratios=1, fire=True)  # its MLP has an inner residual: two adds
    gm.eval()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod.index, args[1], args[2], out)))
             for m in gm.modules() if isinstance(m, ReversibleCoupling)]
    with torch.no_grad():
        gm(x)
        fs = subblock_functions(gm)
        for k, z_km2, z_km1, z_k in seen:
            assert (reconstruct_previous(z_k, z_km1, fs[k - 1](z_km1)) - z_km2).abs().max().item() < 1e-4
            assert (reconstruct_previous(z_k, z_km1, fs[k - 1](z_km1), 0.4, 0.5) - z_km2).abs().max().item() > 1e-3
    for h in hooks:
        h.remove()
    assert len(seen) == 3


def test_model_without_residual_blocks_is_refused():
    net = nn.Sequential(nn.Linear(4, 8), LIF(), nn.Linear(8, 3))
    gm, _ = trace_model(net)
    with pytest.raises(ModelError, match="no residual sub-blocks"):
        InsertReversibleCouplings().apply(gm)
    with pytest.raises(ModelError, match="reversible.enabled=false"):
        binarize(net, "bestformer", input_shape=(2, 4))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _TokenResidualNet()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: the root cannot be traced
            return self.body(x)
        return self.body(-x)


def test_untraceable_root_names_the_part():
    model, _ = trace_model(_Untraceable())
    assert not isinstance(model, fx.GraphModule)
    with pytest.raises(ModelError, match="_Untraceable.*'body'"):
        InsertReversibleCouplings().apply(model)


@pytest.mark.parametrize("name", list_models())
def test_binarize_every_zoo_model_with_couplings(name):
    torch.manual_seed(0)
    model = tiny_model(name)
    r = binarize(model, "bestformer")
    assert any(isinstance(m, ReversibleCoupling) for m in r.model.modules())
    x = example_input_for(model, batch=2)
    classes = model.num_classes if hasattr(model, "num_classes") else model.head.out_features
    r.model.eval()
    with torch.no_grad():
        assert r.model(x).shape == (2, classes)
    r.model.train()
    out = r.model(x)
    assert isinstance(out, tuple) and len(out) == 2 and all(o.shape == (2, classes) for o in out)


class _AttnOnly(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.q(x) @ self.k(x).transpose(-1, -2) @ x


class _Odd(nn.Module):
    """Two attention sub-blocks in a row, then two towers of equal length."""

    def __init__(self, d=8, towers=False):
        super().__init__()
        self.towers = towers
        self.a = nn.ModuleList([_Block(d), _Block(d)] if towers else [_AttnOnly(d), _AttnOnly(d)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        if self.towers:
            return self.head(self.a[0](x).mean(1) * self.a[1](x).mean(1))
        return self.head(self.a[1](self.a[0](x)).mean(1))


def test_non_alternating_and_ambiguous_chains_are_refused():
    gm, _ = trace_model(_Odd())
    with pytest.raises(ModelError, match=r"sub-block 2 \('a.1'\) is attention"):
        InsertReversibleCouplings().apply(gm)
    gm, _ = trace_model(_Odd(towers=True))
    with pytest.raises(ModelError, match="2 equally long chains"):
        InsertReversibleCouplings().apply(gm)


# ------------------------------------------------------------------------------------------ the preserving form

FP_CASES = ["spikformer_cifar", "spikingformer", "spikformer_seq", "sdt_v1"]


@pytest.mark.parametrize("name", FP_CASES)
def test_preserving_couplings_compute_the_fp_model(name):
    """Built from an FP model with binarization off, the coupled model's output equals the FP model's."""
    torch.manual_seed(0)
    model = make_it_fire(tiny_model(name), example_input_for(tiny_model(name), batch=1).shape[1:]).double()
    x = example_input_for(model, batch=3).double()
    r = binarize(model, "identity", example_input=x,
                 overrides={"reversible.enabled": True, "reversible.eval_heads": "head2"})
    couplings = [m for m in r.model.modules() if isinstance(m, ReversibleCoupling)]
    assert couplings and all(m.form == "preserving" and m.coefficients() == (0.0, 1.0) for m in couplings)
    r.model.eval()
    with torch.no_grad():
        want = model(x)
        got = r.model(x)
        r.model.train()
        model.train()
        head, head2 = r.model(x)
        want_train = model(x)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(head2, want_train, atol=1e-12, rtol=0)
    assert not torch.allclose(head, head2)  # head reads the last attention stream


def test_paper_form_changes_the_function_and_preserving_coefficients_train():
    torch.manual_seed(0)
    model = make_it_fire(tiny_model("spikformer_cifar"), example_input_for(tiny_model("spikformer_cifar"),
                                                                         batch=1).shape[1:]).double()
    x = example_input_for(model, batch=3).double()
    over = {"reversible.enabled": True, "reversible.eval_heads": "head2"}
    paper = binarize(model, "identity", example_input=x, overrides={**over, "reversible.form": "paper"}).model.eval()
    assert all(m.form == "paper" and m.coefficients() == (0.5, 0.5)
               for m in paper.modules() if isinstance(m, ReversibleCoupling))
    assert not any(n.endswith((".a", ".b")) for n, _ in paper.named_parameters())  # fixed, no state
    with torch.no_grad():
        assert (paper(x) - model(x)).abs().max() > 1e-3
    preserving = binarize(model, "bestformer", example_input=x).model.train()  # binary, default form
    params = {n: p for n, p in preserving.named_parameters() if n.startswith("reversible.")}
    assert len(params) == 2 * 3  # a_k and b_k of z_2, z_3, z_4
    out = preserving(x)
    (out[0].sum() + out[1].sum()).backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in params.values())


def test_preserving_inverse_once_a_has_moved():
    model, gm, x, _ = _coupled("spikformer_cifar", form="preserving")
    gm.eval()
    couplings = sorted((m for m in gm.modules() if isinstance(m, ReversibleCoupling)), key=lambda m: m.index)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod.index, args[1], args[2], out)))
             for m in couplings]
    with torch.no_grad():
        gm(x)
        z_km2, z_km1, z_k = seen[0][1:]
        with pytest.raises(ValueError, match="plain residual"):  # a = 0: z_0 does not enter z_2
            couplings[0].inverse(z_k, z_km1, z_k - z_km1)
        for i, m in enumerate(couplings):  # as training would move them
            m.a.fill_(0.3 + 0.1 * i)
            m.b.fill_(0.8 - 0.1 * i)
        seen.clear()
        gm(x)
        seen.sort(key=lambda t: t[0])
        streams = reconstruct_streams(gm, seen[-1][3], seen[-1][2])
        expected = [seen[0][1], seen[0][2]] + [t[3] for t in seen]
        assert len(streams) == len(expected) == 5
        for got, want in zip(streams, expected):
            assert (got - want).abs().max().item() < 1e-4
        fs = subblock_functions(gm)
        k, z_km2, z_km1, z_k = seen[0]
        assert (couplings[0].inverse(z_k, z_km1, fs[1](z_km1)) - z_km2).abs().max().item() < 1e-10
    for h in hooks:
        h.remove()


# ------------------------------------------------------------------------------------------ topologies

def _fp_macs_and_head(model, x):
    s = summarize(model, example_input=x)
    return s.macs, next(r.macs for r in s.rows if r.name == "head")


def test_hierarchical_stages_are_coupled_stage_by_stage_without_duplicates():
    torch.manual_seed(0)
    model = Hierarchical().eval()
    x = example()
    gm, _ = trace_model(model)
    stages = find_stages(gm)
    assert [[b.where for b in t.blocks] for t in stages] == [
        ["stage1.0.attn", "stage1.0.mlp"], ["stage2.0.attn", "stage2.0.mlp", "stage2.1.attn", "stage2.1.mlp"]]
    assert [b.attention for b in stages[0].blocks] == [False, False]  # token attention has no matmul
    fp_macs, head_macs = _fp_macs_and_head(model, x)
    r = binarize(model, "identity", example_input=x, overrides={"reversible.enabled": True})
    couplings = [m for m in r.model.modules() if isinstance(m, ReversibleCoupling)]
    assert sorted((m.stage, m.index) for m in couplings) == [(0, 2), (1, 2), (1, 3), (1, 4)]
    assert any("stage 0 ('stage1')" in n and "stage 1 ('stage2')" in n for n in r.notes)
    r.model.eval()
    assert summarize(r.model, example_input=x).macs == fp_macs + head_macs
    named = {n: m for n, m in r.model.named_modules() if isinstance(m, (nn.Linear, LIF))}
    calls = record_calls(r.model, named, x)
    assert all(c == 1 for c in calls.counts.values()), {n: c for n, c in calls.counts.items() if c != 1}
    with torch.no_grad():  # eval = mean of the heads; head2 alone is the FP model
        r.model.dual_head.eval_heads = "head2"
        torch.testing.assert_close(r.model(x), model(x), atol=1e-6, rtol=0)


def test_weight_layers_after_the_last_stage_get_no_second_copy():
    """An empty last stage (QKFormer with depths=2 leaves stage 3 without blocks): its downsampling lies between
    the coupled stage and the head, so head2 would run it twice; one head reads the last stream instead."""
    torch.manual_seed(0)
    model = Hierarchical(depths=(2, 0)).eval()
    x = example()
    fp_macs, _ = _fp_macs_and_head(model, x)
    r = binarize(model, "identity", example_input=x, overrides={"reversible.enabled": True})
    assert sorted((m.stage, m.index) for m in r.model.modules() if isinstance(m, ReversibleCoupling)) == \
        [(0, 2), (0, 3), (0, 4)]
    assert not any(isinstance(m, DualHeadOutput) for m in r.model.modules())
    assert any("no head2" in n and "'down.reduction'" in n for n in r.notes)
    r.model.eval()
    assert summarize(r.model, example_input=x).macs == fp_macs
    named = {n: m for n, m in r.model.named_modules() if isinstance(m, (nn.Linear, LIF))}
    calls = record_calls(r.model, named, x)
    assert all(c == 1 for c in calls.counts.values()), {n: c for n, c in calls.counts.items() if c != 1}
    with torch.no_grad():  # preserving couplings at insertion: the FP function
        torch.testing.assert_close(r.model(x), model(x), atol=1e-6, rtol=0)


def test_recipe_names_the_stages_to_couple():
    torch.manual_seed(0)
    model = Hierarchical().eval()
    x = example()
    r = binarize(model, "identity", example_input=x,
                 overrides={"reversible.enabled": True, "reversible.stages": ["stage2"]})
    assert sorted((m.stage, m.index) for m in r.model.modules() if isinstance(m, ReversibleCoupling)) == \
        [(1, 2), (1, 3), (1, 4)]
    assert any("stage(s) 0 left uncoupled" in n for n in r.notes)
    r = binarize(model, "identity", example_input=x, overrides={"reversible.enabled": True, "reversible.stages": ["0"]})
    assert [(m.stage, m.index) for m in r.model.modules() if isinstance(m, ReversibleCoupling)] == [(0, 2)]
    assert not any(isinstance(m, DualHeadOutput) for m in r.model.modules())
    assert any("no head2" in n for n in r.notes)
    with pytest.raises(RecipeError, match="no trunk stage is called 'stage9'.*stage1"):
        binarize(model, "identity", example_input=x,
                 overrides={"reversible.enabled": True, "reversible.stages": ["stage9"]})


def test_model_with_two_heads_is_left_alone():
    torch.manual_seed(0)
    model = TwoHeaded().eval()
    x = example()
    r = binarize(model, "bestformer", example_input=x)
    assert not any(isinstance(m, (ReversibleCoupling, DualHeadOutput)) for m in r.model.modules())
    assert any("already has two heads ('head', 'head2')" in n for n in r.notes)
    assert r.model.head2.weight.shape == model.head2.weight.shape  # its own second head, not a copy of ours


@pytest.mark.parametrize("cls", [LogitsAndNone, lambda: Hierarchical(aux=True)], ids=["logits_none", "aux"])
def test_extra_outputs_keep_their_place(cls):
    torch.manual_seed(0)
    model = cls().eval()
    x = example()
    r = binarize(model, "identity", example_input=x,
                 overrides={"reversible.enabled": True, "reversible.eval_heads": "head2"})
    gm = r.model.eval()
    with torch.no_grad():
        want, got = model(x), gm(x)
        assert isinstance(got, tuple) and len(got) == 2
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
        if want[1] is None:
            assert got[1] is None
        else:
            torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)  # the aux logits, unchanged
        gm.train()
        out = gm(x)
        (head, head2), second = out
        assert head.shape == head2.shape == want[0].shape
        from bestcompress.training.outputs import select_logits, two_headed
        assert two_headed(gm)
        picked = select_logits(out, two_heads=True)  # what the trainer gives the loss: both heads
        assert picked[0] is head and picked[1] is head2


def test_outputs_computed_twice_from_the_last_block_are_ambiguous():
    class TwoFromLast(LogitsAndNone):
        def forward(self, x):
            x = self.embed_lif(self.embed(x.unsqueeze(0).repeat(self.T, 1, 1, 1)))
            for blk in self.block:
                x = blk(x)
            return self.head(x.mean(2).mean(0)), x.mean(2).mean(0)

    gm, _ = trace_model(TwoFromLast().eval())
    with pytest.raises(ModelError, match="returns 2 outputs computed from its last block"):
        InsertReversibleCouplings().apply(gm)


class _TwoContainers(nn.Module):
    """One stage whose blocks sit in two containers that share no prefix (Meta-SpikeFormer's ConvBlock2_1 and
    ConvBlock2_2, each a Sequential of one block)."""

    def __init__(self, c=3, d=8, classes=4, T=2):
        super().__init__()
        from topology_models import Block, _lif, _time_first
        self.T, self._time_first = T, _time_first
        self.embed, self.embed_lif = nn.Linear(c, d), _lif()
        self.ConvBlock2_1, self.ConvBlock2_2 = nn.Sequential(Block(d)), nn.Sequential(Block(d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed_lif(self.embed(self._time_first(x, self.T)))
        return self.head(self.ConvBlock2_2(self.ConvBlock2_1(x)).mean(2).mean(0))


def test_a_stage_across_containers_is_named_by_them_and_selectable_by_either():
    from bestcompress.passes.reversible import stage_name
    torch.manual_seed(0)
    model = _TwoContainers().eval()
    x = example()
    gm, _ = trace_model(model, example_input=x)
    stages = find_stages(gm)
    assert [stage_name(t) for t in stages] == ["ConvBlock2_1+ConvBlock2_2"]
    for want in ("ConvBlock2_1+ConvBlock2_2", "ConvBlock2_2"):
        r = binarize(model, "identity", example_input=x,
                     overrides={"reversible.enabled": True, "reversible.stages": [want]})
        assert sum(isinstance(m, ReversibleCoupling) for m in r.model.modules()) == 3, want
    with pytest.raises(RecipeError, match=r"stages: 0 \('ConvBlock2_1\+ConvBlock2_2'\)"):
        binarize(model, "identity", example_input=x,
                 overrides={"reversible.enabled": True, "reversible.stages": ["ConvBlock3"]})
