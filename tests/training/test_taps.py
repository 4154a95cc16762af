"""feature_taps: matching block outputs of student and teacher, and no hook left behind."""
import pytest
import torch

from bestcompress.convert import binarize
from bestcompress.model_facts import example_input_for
from bestcompress.training import feature_alignment_loss, feature_taps
from bestcompress.errors import ModelError
from bestcompress.zoo import tiny_model
from bestcompress.zoo._common import time_first_sequence


def _hooks(*models):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules())


def _block_outputs(model, x):
    z = model.patch_embed(time_first_sequence(x, model.T, "static"))
    outs = []
    for blk in model.block:
        z = blk(z)
        outs.append(z)
    return outs


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return tiny_model("spikformer_seq", depths=2).eval()


def test_coupled_student_and_eager_teacher(teacher):
    student = binarize(teacher, "bestformer").model.train()
    x = example_input_for(teacher, batch=2)
    with torch.no_grad():
        reference = _block_outputs(teacher, x)
    before = _hooks(student, teacher)
    with feature_taps(student, teacher) as taps:
        assert _hooks(student, teacher) == before + 6  # two blocks each, and one list reset per model
        with torch.no_grad():
            teacher(x)
            student(x)
            assert len(taps.student) == 2 and len(taps.teacher) == 2
            for got, want in zip(taps.teacher, reference):
                torch.testing.assert_close(got, want, atol=0, rtol=0)
            assert [s.shape for s in taps.student] == [t.shape for t in taps.teacher]
            student(x)  # a second forward replaces the student's list instead of growing it
            assert len(taps.student) == 2 and len(taps.teacher) == 2
        taps.clear()
        assert taps.student == [] and taps.teacher == []
    assert _hooks(student, teacher) == before
    student(x)
    teacher(x)
    assert taps.student == [] and taps.teacher == []  # nothing records after the with block


def test_uncoupled_graph_student_equal_to_teacher_has_zero_feature_loss(teacher):
    student = binarize(teacher, "identity").model.eval()  # one traced graph, no couplings, same function
    x = example_input_for(teacher, batch=2)
    with feature_taps(student, teacher) as taps:
        assert "forward" in student.__dict__  # its forward records through an fx Interpreter meanwhile
        with torch.no_grad():
            torch.testing.assert_close(student(x), teacher(x))
        assert len(taps.student) == len(taps.teacher) == 2
        assert feature_alignment_loss(taps.student, taps.teacher).item() < 1e-6
    assert "forward" not in student.__dict__


def test_hooks_removed_on_error_and_count_mismatch(teacher):
    student = binarize(teacher, "bestformer").model
    before = _hooks(student, teacher)
    with pytest.raises(RuntimeError):
        with feature_taps(student, teacher):
            raise RuntimeError("interrupted")
    assert _hooks(student, teacher) == before
    shallow = tiny_model("spikformer_seq", depths=1)
    with pytest.raises(ModelError, match="student has 2 transformer blocks but the teacher has 1"):
        with feature_taps(student, shallow):
            pass
    assert _hooks(student, teacher, shallow) == before


def test_attention_operands_are_tapped_in_call_order(teacher):
    student = binarize(teacher, "bestformer").model.train()
    x = example_input_for(teacher, batch=2)
    before = _hooks(student, teacher)
    with feature_taps(student, teacher, blocks=False, attention=True) as taps:
        with torch.no_grad():
            teacher(x)
            student(x)
            student(x)  # a second forward replaces the list
        assert len(taps.student.attention) == len(taps.teacher.attention) == 4  # q·kᵀ and map·v, two blocks
        assert taps.student == [] and taps.teacher == []  # blocks not tapped
        for (sa, sb), (ta, tb) in zip(taps.student.attention, taps.teacher.attention):
            assert sa.shape == ta.shape and sb.shape == tb.shape
        q, kt = taps.teacher.attention[0]
        assert q.shape[-1] == kt.shape[-2]  # [.., N, d] @ [.., d, N]
        taps.clear()
        assert taps.student.attention == []
    assert _hooks(student, teacher) == before
    assert not torch.overrides._get_current_function_mode_stack()  # no mode left behind


def test_hierarchical_student_and_teacher_blocks_match_stage_by_stage():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from topology_models import Hierarchical, example
    torch.manual_seed(0)
    fp = Hierarchical().eval()
    x = example()
    student = binarize(fp, "bestformer", example_input=x).model.train()
    with feature_taps(student, fp) as taps:
        with torch.no_grad():
            fp(x)
            student(x)
        # stage 1 has one block, stage 2 two: one MLP stream per block, in forward order
        assert [tuple(t.shape[-2:]) for t in taps.teacher] == [(8, 8), (4, 16), (4, 16)]
        assert [s.shape for s in taps.student] == [t.shape for t in taps.teacher]
