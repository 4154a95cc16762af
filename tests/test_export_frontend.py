"""torch.export(strict=False) as the second tracing front-end (bestcompress/export_frontend.py), and the models of
issue 10 that need the tracer's fallbacks, each through binarize -> one distill step -> a verified export."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import bestcompress as bc
from bestcompress.convert import binarize
from bestcompress.data import load_dataset
from bestcompress.nn.attention import AttentionMapNeuron
from bestcompress.nn.lif import LIF
from bestcompress.nn.reversible import ReversibleCoupling
from bestcompress.trace import trace_model
from bestcompress.training.trainer import distill

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topology_models import ManyPads, RankBranching, SlotTokens, example  # noqa: E402

aten = torch.ops.aten


def _call_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_a_root_fx_cannot_trace_is_captured_by_torch_export_with_its_leaves_as_modules():
    torch.manual_seed(0)
    model = SlotTokens().eval()
    x = example(batch=2)
    eager, fx_report = trace_model(copy.deepcopy(model))  # without an example input only fx is tried
    assert not isinstance(eager, fx.GraphModule) and fx_report.eager
    gm, report = trace_model(model, example_input=x)
    assert isinstance(gm, fx.GraphModule) and gm.bc_front_end == "torch.export" and not report.eager
    targets = _call_targets(gm)
    for name, m in model.named_modules():  # every weight layer and neuron is called as the module itself
        if isinstance(m, (nn.Linear, LIF)):
            assert name in targets
    assert not any(n.target is aten.copy_.default for n in gm.graph.nodes)  # the slot write is an indexed write
    assert any(n.target is torch.matmul for n in gm.graph.nodes)  # the passes' forms, not ATen's
    assert "captured by torch.export(strict=False)" in "\n".join(report.lines())
    with torch.no_grad():
        for batch in (2, 5):  # the batch size stays free
            xb = example(batch=batch, seed=batch)
            assert torch.equal(gm(xb), model(xb))


class _RecurrentSlots(nn.Module):
    """A leaf with a state pair in and out (nn.LSTMCell, state None at the first step) under a root that writes
    its outputs into a preallocated tensor (which fx cannot trace)."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(3, 5), nn.Linear(5, 2)

    def forward(self, x):  # [T, B, 3]
        out = x.new_zeros(x.shape[0], x.shape[1], 5)
        state = None
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            out[t] = state[0]
        return self.head(out.mean(0)), state[1]


def test_leaf_calls_keep_their_argument_and_output_structure():
    torch.manual_seed(0)
    model = _RecurrentSlots().eval()
    x = torch.randn(3, 2, 3)
    gm, report = trace_model(model, example_input=x)
    assert getattr(gm, "bc_front_end", None) == "torch.export"
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "cell"]
    assert len(calls) == 3 and calls[0].args[1] is None and isinstance(calls[1].args[1], tuple)
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


class _ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # a branch on a tensor value: neither fx nor torch.export can capture it
            return self.fc(x)
        return -x


class _SlotsAroundValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.lif, self.head = _ValueBranch(), LIF(), nn.Linear(4, 2)

    def forward(self, x):  # [B, 4]
        y = x.new_zeros(2, x.shape[0], 4)  # T = 2 steps
        y[:, :, :] = self.gate(x)
        return self.head(self.lif(y).mean(0))


def test_a_module_torch_export_cannot_capture_becomes_a_reported_leaf():
    torch.manual_seed(0)
    model = _SlotsAroundValueBranch().eval()
    x = torch.rand(3, 4) + 0.5
    gm, report = trace_model(model, example_input=x)
    assert gm.bc_front_end == "torch.export" and gm.bc_trace_leaves == ["gate"]
    assert [n for n, _ in report.leaves_added] == ["gate"] and "gate" in _call_targets(gm)
    with torch.no_grad():
        for xb in (x, torch.rand(5, 4) + 0.5, -x):  # another batch size; the other branch of the leaf
            assert torch.equal(gm(xb), model(xb))


# ------------------------------------------------------------- binarize -> one distill step -> verified export

CASES = {
    # more than 32 untraceable BNAndPad modules: leaves, one retry for the whole class; fx stays the front-end
    "many_pads": (lambda: ManyPads(units=33, T=1), lambda: torch.rand(2, 2, 4, 4), (2, 4, 4),
                  ["front-end: torch.fx", "'units.0.pad' kept as an opaque leaf", "and 28 more kept as opaque"]),
    # `len(x.shape) < 4` specialised on the example; (logits, None) outputs
    "rank_branch": (RankBranching, lambda: example(batch=2), (8, 3),
                    ["specialised on the example input's shapes: len(", "front-end: torch.fx"]),
    # a root forward fx cannot trace at all
    "slot_tokens": (SlotTokens, lambda: example(batch=2), (8, 3),
                    ["front-end: torch.export", "'<root>' captured by torch.export(strict=False)"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_public_style_models_binarize_distill_and_export_verified(case, tmp_path):
    make, make_x, shape, expected_notes = CASES[case]
    torch.manual_seed(0)
    teacher, x = make().eval(), make_x()
    result = binarize(copy.deepcopy(teacher), "bestformer", example_input=x)
    notes = "\n".join(result.notes)
    for expected in expected_notes:
        assert expected in notes, (expected, notes)
    student = result.model
    assert any(isinstance(m, AttentionMapNeuron) for m in student.modules())  # the attention map is binary
    assert any(isinstance(m, ReversibleCoupling) for m in student.modules())  # the trunk was found
    assert "layers binarized" in notes and not any("kept 'block" in n for n in result.notes)
    data = load_dataset("synthetic", input_shape=shape, num_classes=4, subset=16)
    before = [p.detach().clone() for p in student.parameters()]
    distill(student, teacher, data, epochs=1, limit_batches=1, log=lambda *a: None,
            overrides={"train.batch_size": 8, "train.calibrate_batches": 0})
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # one step was taken
    out = bc.export(student.eval(), "qonnx", tmp_path / "m.onnx", example_input=x)  # raises unless verified
    assert Path(out).stat().st_size > 0


class _SlotTokensKD(SlotTokens):
    """SlotTokens (fx cannot trace its root) with a distillation head: (head, head_kd) in training, their mean in
    eval, as Meta-SpikeFormer's kd=True returns."""

    def __init__(self):
        super().__init__()
        self.head_kd = nn.Linear(self.head.in_features, self.head.out_features)

    def forward(self, x):
        e = self.embed_lif(self.embed(x.unsqueeze(0).repeat(self.T, 1, 1, 1)))
        T, B, N, D = e.shape
        x = e.new_zeros(T, B, N + 1, D)
        x[:, :, 1:] = e
        for blk in self.block:
            x = blk(x)
        feat = x[:, :, 1:].mean(2).mean(0)
        h, h_kd = self.head(feat), self.head_kd(feat)
        if self.training:
            return h, h_kd
        return (h + h_kd) / 2


def test_torch_export_captures_both_self_training_branches():
    from bestcompress.mode_branches import ModeSwitch

    torch.manual_seed(0)
    model = _SlotTokensKD().eval()
    x = example(batch=2)
    gm, report = trace_model(model, example_input=x)
    assert gm.bc_front_end == "torch.export"
    assert sum(isinstance(m, ModeSwitch) for m in gm.modules()) == 1 and gm.bc_two_heads is True
    assert any("branches on self.training: both branches traced" in line for line in report.lines())
    with torch.no_grad():
        (h, h_kd), (rh, rh_kd) = gm.train()(x), model.train()(x)
        assert torch.equal(h, rh) and torch.equal(h_kd, rh_kd) and not torch.equal(h, h_kd)
        assert torch.equal(gm.eval()(x), model.eval()(x))
    targets = _call_targets(gm)
    assert targets.count("head") == 1 and targets.count("head_kd") == 1  # the shared trunk is there once


def test_a_kd_model_fx_cannot_trace_distills_both_heads_and_exports_verified(tmp_path):
    torch.manual_seed(0)
    teacher, x = _SlotTokensKD().eval(), example(batch=2)
    result = binarize(copy.deepcopy(teacher), "bestformer", example_input=x)
    student = result.model
    assert student.bc_two_heads is True and "front-end: torch.export" in "\n".join(result.notes)
    assert isinstance(student.train()(x), tuple) and isinstance(student.eval()(x), torch.Tensor)
    heads = [student.get_submodule(h).weight.detach().clone() for h in ("head", "head_kd")]
    data = load_dataset("synthetic", input_shape=(8, 3), num_classes=4, subset=16)
    distill(student, teacher, data, epochs=1, limit_batches=1, log=lambda *a: None,
            overrides={"train.batch_size": 8, "train.calibrate_batches": 0})
    for h, before in zip(("head", "head_kd"), heads):  # both heads trained: the training branch ran
        assert not torch.equal(student.get_submodule(h).weight.detach(), before)
    out = bc.export(student.eval(), "qonnx", tmp_path / "m.onnx", example_input=x)  # raises unless verified
    assert Path(out).stat().st_size > 0
