"""Models that already carry coupled streams (one head): RevViT-style reversible block pairs and BESTformer-style
two-stream blocks are recognised by InsertReversibleCouplings and left unchanged with a note, and then go through
the default recipe: weights and attention binarized, one distill step, a verified QONNX export."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bestcompress as bc
from bestcompress.convert import binarize
from bestcompress.data import load_dataset
from bestcompress.nn.attention import AttentionMapNeuron
from bestcompress.nn.binary import is_binary_layer
from bestcompress.nn.lif import LIF
from bestcompress.nn.reversible import DualHeadOutput, ReversibleCoupling
from bestcompress.passes.shapes import record_calls
from bestcompress.trace import trace_model
from bestcompress.training.trainer import distill
from bestcompress.trunk import coupled_streams
from bestcompress.zoo import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from topology_models import (  # noqa: E402
    Hierarchical, LogitsAndNone, RevViT, TwoStreamOneHead, example, loud,
)

# model, and what the note must say about where the streams are coupled
CASES = {
    "revvit": (RevViT, "'rev_blocks.0.G' reads the stream"),
    "two_stream": (TwoStreamOneHead, "to the output of 'block.0.mlp'"),
}


def _model(case):
    torch.manual_seed(0)
    return loud(CASES[case][0]()).eval()


def _inserted(model):
    return [m for m in model.modules() if isinstance(m, (ReversibleCoupling, DualHeadOutput))]


@pytest.mark.parametrize("case", sorted(CASES))
def test_existing_streams_are_left_alone_and_compute_the_source(case):
    model, x = _model(case), example()
    r = binarize(model, "identity", example_input=x, overrides={"reversible.enabled": True})
    note = next(n for n in r.notes if n.startswith("InsertReversibleCouplings"))
    assert "already has coupled streams" in note and CASES[case][1] in note and "left unchanged" in note, note
    assert not _inserted(r.model) and not hasattr(r.model, "head2")
    gm = r.model.eval()
    with torch.no_grad():
        want = model(x)
        assert want.abs().sum() > 0
        torch.testing.assert_close(gm(x), want, atol=1e-6, rtol=0)
    assert bc.summarize(gm, example_input=x).macs == bc.summarize(model, example_input=x).macs
    named = {n: m for n, m in gm.named_modules() if isinstance(m, (nn.Linear, LIF))}
    assert all(c == 1 for c in record_calls(gm, named, x).counts.values())  # nothing runs twice


def test_the_test_models_fire():
    """The equal-output checks above mean something only if the sub-blocks' neurons spike."""
    for case in CASES:
        model, rates = _model(case), []
        hooks = [m.register_forward_hook(lambda mod, a, out: rates.append(out.mean().item()))
                 for m in model.modules() if isinstance(m, LIF)]
        with torch.no_grad():
            model(example())
        for h in hooks:
            h.remove()
        assert len(rates) == 15 and min(rates) > 0.05, (case, rates)


def test_plain_residual_trunks_show_no_coupled_streams():
    torch.manual_seed(0)
    for model in (LogitsAndNone(), Hierarchical(aux=True), tiny_model("spikformer_cifar"), tiny_model("sdt_v1")):
        gm, _ = trace_model(model.eval())
        assert coupled_streams(gm) == [], type(model).__name__
    one_block, _ = trace_model(RevViT(depth=1).eval())  # one reversible block: the two halves of one chunk
    assert len(coupled_streams(one_block)) >= 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_recipe_binarizes_distills_and_exports_verified(case, tmp_path):
    teacher, x = _model(case), example(batch=2)
    result = bc.binarize(copy.deepcopy(teacher), "bestformer", example_input=x)
    assert any("already has coupled streams" in n for n in result.notes)
    student = result.model
    assert not _inserted(student)
    assert any(isinstance(m, AttentionMapNeuron) for m in student.modules())  # the attention maps are binary
    binary = [n for n, m in student.named_modules() if is_binary_layer(m)]
    assert len(binary) == 2 * 6  # q, k, v, proj, fc1, fc2 of each of the 2 blocks; embed and head stay fp32
    data = load_dataset("synthetic", input_shape=(8, 3), num_classes=4, subset=16)
    before = [p.detach().clone() for p in student.parameters()]
    distill(student, teacher, data, epochs=1, limit_batches=1, log=lambda *a: None,
            overrides={"train.batch_size": 8, "train.calibrate_batches": 0})
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # one step was taken
    out = bc.export(student.eval(), "qonnx", tmp_path / "m.onnx", example_input=x)  # raises unless verified
    assert Path(out).stat().st_size > 0
