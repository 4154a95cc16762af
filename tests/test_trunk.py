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
    gm = _gm(TwoHeaded())  # `if self.training`: both branches traced (mode_branches), (head, head2) then the mean
    *train_pair, logits = output_entries(gm)
    assert [n.target for n in train_pair] == ["head", "head2"]
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


class _TimeLoop(nn.Module):
    """A Python loop over 3 time steps calling the same two-stage network at each step (the snnTorch habit)."""

    def __init__(self):
        super().__init__()
        self.net = Hierarchical(depths=(2, 1), T=1)
        self.num_steps = 3

    def forward(self, x):
        out = 0
        for t in range(self.num_steps):
            out = out + self.net(x * (t + 1))
        return out


def test_a_time_loop_is_one_stage_per_resolution_with_one_copy_per_step():
    gm = _gm(_TimeLoop())
    assert gm.bc_time_steps == 3
    stages = find_stages(gm)  # 6 chains: two stages at each of 3 steps
    assert [len(t.blocks) for t in stages] == [4, 2] and [len(t.steps) for t in stages] == [3, 3]
    assert [t.blocks[0].where for t in stages] == ["net.stage1.0.attn", "net.stage2.0.attn"]
    for stage in stages:
        assert [[sb.step for sb in copy.blocks] for copy in stage.steps] == [[s] * len(stage.blocks) for s in range(3)]
        assert stage.per_step() == stage.steps and stage.steps[0].blocks == stage.blocks
    last = stages[-1]
    assert {output_logits(gm, copy.blocks[-1].out) for copy in last.steps} == set(output_entries(gm))
    assert find_trunk(gm).per_step() == stages[0].steps


def test_time_steps_are_marked_on_a_graph_traced_elsewhere():
    from torch import fx
    from bestcompress.trace import SNNTracer
    model = _TimeLoop().eval()
    gm = fx.GraphModule(model, SNNTracer().trace(model))  # as the feature taps trace a teacher
    assert not hasattr(gm, "bc_time_steps")
    assert [len(t.steps) for t in find_stages(gm)] == [3, 3] and gm.bc_time_steps == 3


def test_without_a_time_loop_a_stage_has_no_step_copies():
    (stage,) = find_stages(_gm(tiny_model("spikformer_seq", depths=2)))
    assert stage.steps == [] and stage.per_step() == [stage]
