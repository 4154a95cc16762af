"""bestcompress.trunk: stages of a hierarchical model, parallel chains, the logits entry and existing heads."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bestcompress.errors import ModelError
from bestcompress.trace import trace_model
from bestcompress.trunk import find_stages, find_trunk, final_heads, output_entries, output_logits, two_heads
from bestcompress.zoo import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topology_models import Block, Hierarchical, LogitsAndNone, TwoHeaded  # noqa: E402


def _gm(model):
    gm, _ = trace_model(model.eval())
    return gm


def test_plain_transformer_is_one_stage():
    gm = _gm(tiny_model("spikformer_seq", depths=2))
    stages = find_stages(gm)
    assert len(stages) == 1
    assert [b.where for b in stages[0].blocks] == ["block.0.attn", "block.0.mlp", "block.1.attn", "block.1.mlp"]
    assert [b.attention for b in stages[0].blocks] == [True, False, True, False]
    assert find_trunk(gm) is not None and len(find_trunk(gm).blocks) == 4


def test_hierarchical_stages_in_order_and_the_logits_entry():
    gm = _gm(Hierarchical(depths=(2, 1), aux=True))
    stages = find_stages(gm)
    assert [len(t.blocks) for t in stages] == [4, 2]
    assert stages[0].blocks[0].where == "stage1.0.attn" and stages[1].blocks[0].where == "stage2.0.attn"
    assert len(find_trunk(gm).blocks) == 4  # the longest stage
    entries = output_entries(gm)
    assert len(entries) == 2
    logits = output_logits(gm, stages[-1].blocks[-1].out)
    assert logits is entries[0]  # the aux logits come from stage 1, not from the last stage
    assert [n.target for n in final_heads(gm, logits)] == ["head"]
    assert two_heads(gm, logits) == []


def test_two_heads_and_none_outputs():
    gm = _gm(TwoHeaded())
    (logits,) = output_entries(gm)
    assert two_heads(gm, logits) == ["head", "head2"]
    gm = _gm(LogitsAndNone())
    assert len(output_entries(gm)) == 1  # the None is no node


class _Towers(nn.Module):
    """Two equally long chains side by side (not one after the other)."""

    def __init__(self, d=8):
        super().__init__()
        self.left, self.right = Block(d), Block(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = x.unsqueeze(0).repeat(2, 1, 1, 1)
        return self.head((self.left(x) * self.right(x)).mean(2).mean(0))


def test_parallel_chains_are_not_stages():
    gm = _gm(_Towers())
    with pytest.raises(ModelError, match="2 equally long chains"):
        find_stages(gm)
