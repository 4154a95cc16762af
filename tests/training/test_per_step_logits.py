"""Per-time-step logits [T, B, classes] (SpikingResformer's habit; its training script averages over T): averaged
over time wherever bestcompress reads logits, with a note, and such a model through binarize -> one distill
step -> evaluate -> a verified QONNX export."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bestcompress as bc
from bestcompress.convert import binarize
from bestcompress.data import load_dataset
from bestcompress.training.outputs import is_per_step, mean_logits, select_logits, time_note
from bestcompress.training.trainer import distill, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from topology_models import Block, _lif, example  # noqa: E402


class PerStepLogits(nn.Module):
    """[B, N, C] -> logits per time step [T, B, classes], written in the style of public spiking code."""

    def __init__(self, c=3, d=8, depth=2, classes=4, T=2):
        super().__init__()
        self.T = T
        self.embed, self.embed_lif = nn.Linear(c, d), _lif()
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.classifier = nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed_lif(self.embed(x.unsqueeze(0).repeat(self.T, 1, 1, 1)))
        for blk in self.blocks:
            x = blk(x)
        return self.classifier(x.mean(2))  # [T, B, classes]: the caller averages over T


def test_the_rule_averages_only_a_time_axis():
    model = PerStepLogits(T=3)
    t = torch.randn(3, 5, 4)
    assert torch.equal(select_logits(t, model=model, batch=5), t.mean(0))
    assert torch.equal(mean_logits((t, None), model=model, batch=5), t.mean(0))
    assert select_logits(t, model=model, batch=4) is t  # second axis not the batch: left as it is
    assert select_logits(t) is t  # no batch given: nothing is assumed
    assert not is_per_step(torch.randn(2, 5, 4), 3, 5)  # first axis not the declared T
    assert is_per_step(torch.randn(2, 5, 4), None, 5) and not is_per_step(torch.randn(5, 5, 4), None, 5)
    assert not is_per_step(torch.randn(5, 4), 3, 5)
    h, h2 = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    assert torch.allclose(mean_logits((h, h2), two_heads=True, model=model, batch=5), (h.mean(0) + h2.mean(0)) / 2)
    assert "averages them over T" in time_note(t, model, 5) and time_note(t.mean(0), model, 5) is None


def test_a_per_step_model_binarizes_distills_evaluates_and_exports_verified(tmp_path):
    torch.manual_seed(0)
    teacher, x = PerStepLogits().eval(), example(batch=2)
    with torch.no_grad():
        assert teacher(x).shape == (2, 2, 4)
    student = binarize(copy.deepcopy(teacher), "bestformer", example_input=x).model
    data = load_dataset("synthetic", input_shape=(8, 3), num_classes=4, subset=16)
    said = []
    before = [p.detach().clone() for p in student.parameters()]
    distill(student, teacher, data, epochs=1, limit_batches=1, log=said.append,
            overrides={"train.batch_size": 8, "train.calibrate_batches": 0})
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # one step was taken
    assert any("logits per time step" in str(s) and "student" in str(s) for s in said), said
    scores = evaluate(student, data)
    student.eval()
    with torch.no_grad():
        direct = student(data.test.tensors[0])
        direct = direct[0] if isinstance(direct, tuple) else direct
        assert direct.dim() == 3
        want = float((direct.mean(0).argmax(-1) == data.test.tensors[1]).float().mean()) * 100
    assert scores["top1"] == pytest.approx(want)
    out = bc.export(student, "qonnx", tmp_path / "m.onnx", example_input=x)  # raises unless verified
    assert Path(out).stat().st_size > 0
