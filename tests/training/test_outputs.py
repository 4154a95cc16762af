"""The logits found by rule in any model output, and models with such outputs through distill and evaluate."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bestcompress.data import load_dataset
from bestcompress.errors import ModelError
from bestcompress.nn.reversible import DualHeadOutput
from bestcompress.training.outputs import mean_logits, select_logits, two_headed
from bestcompress.training.trainer import distill, evaluate


def test_rules():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert select_logits(a) is a
    assert select_logits({"logits": a, "aux": b}) is a and select_logits({"out": a}) is a
    assert select_logits((a, None)) is a and select_logits([None, a]) is a
    assert select_logits((a, b)) is a  # aux output: not a coupled model, so not two heads
    assert select_logits((a, b), two_heads=True) == (a, b)
    assert select_logits((a, None), two_heads=True) is a
    assert torch.equal(mean_logits((a, b), two_heads=True), (a + b) / 2)
    assert select_logits({"logits": (a, None)}) is a
    with pytest.raises(ModelError, match="'logits' or 'out'"):
        select_logits({"features": a})
    with pytest.raises(ModelError, match="no logits tensor"):
        select_logits((None, None))


def test_two_headed_means_the_coupled_output():
    assert two_headed(nn.Sequential(nn.Linear(2, 2), DualHeadOutput()))
    assert not two_headed(nn.Linear(2, 2))
    marked = nn.Linear(2, 2)
    marked.bc_two_heads = True
    assert two_headed(marked)


class TupleNet(nn.Module):
    """A classifier in the style of public code that returns (logits, None) or a dict with aux logits."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU())
        self.head, self.aux = nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(x)
        if self.style == "none":
            return self.head(h), None
        if self.style == "aux":
            return self.head(h), self.aux(h)
        return {"logits": self.head(h), "aux_logits": self.aux(h)}


@pytest.mark.parametrize("style", ["none", "aux", "dict"])
def test_models_with_extra_outputs_distill_and_evaluate(style):
    data = load_dataset("synthetic", input_shape=(1, 6), num_classes=3, subset=60)
    torch.manual_seed(0)
    teacher, student = TupleNet(style), TupleNet(style)
    result = distill(student, teacher, data, "bestformer", epochs=2, log=lambda *a: None,
                     overrides={"train.batch_size": 16, "reversible.enabled": False, "train.calibrate_batches": 0,
                                "distill.losses": ["hard"]})
    assert len(result.metrics) == 2 and "train_hard" in result.final
    scores = evaluate(student, data)
    with torch.no_grad():
        student.eval()
        direct = float((student.head(student.body(data.test.tensors[0])).argmax(-1)
                        == data.test.tensors[1]).float().mean()) * 100
    assert scores["top1"] == pytest.approx(direct)  # scored on the main logits, not the aux ones
