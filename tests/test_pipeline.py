"""End to end on a model written in the snnTorch style (explicit init_leaky membranes, a Python loop over time):
binarize -> a few distillation steps -> evaluate (deterministic) -> export verified against PyTorch."""
import pytest
import torch

import bestcompress as bc
from bestcompress.exporters import export_model
from bestcompress.nn.attention import StepMapNeuron
from bestcompress.nn.binary import is_binary_layer
from bestcompress.data import load_dataset

pytest.importorskip("snntorch")

# The default recipe as a user runs it: couplings on (one coupling per sub-block, shared by every step of the loop)
DEFAULT = {}


@pytest.fixture(scope="module")
def student_and_teacher():
    from tests.thirdparty_models import SnnTorchTimeLoopTransformer
    torch.manual_seed(0)
    teacher = SnnTorchTimeLoopTransformer().eval()
    result = bc.binarize(teacher, "bestformer", overrides=DEFAULT)
    return result, teacher


def test_time_loop_model_binarizes_with_one_shared_map_neuron_per_attention(student_and_teacher):
    result, teacher = student_and_teacher
    gm = result.model
    assert gm.bc_time_steps == teacher.num_steps
    assert sum(isinstance(m, StepMapNeuron) for m in gm.modules()) == len(teacher.blocks)
    assert sum(is_binary_layer(m) for m in gm.modules()) == 6 * len(teacher.blocks)  # q, k, v, out, fc1, fc2
    steps = {n.meta["bc_time_step"] for n in gm.graph.nodes if n.meta.get("bc_step_module") == "blocks.0.attn.q_fc"}
    assert steps == set(range(teacher.num_steps))


def test_distill_then_evaluate_then_export_verified(student_and_teacher, tmp_path):
    result, teacher = student_and_teacher
    student = result.model
    data = load_dataset("synthetic", student, subset=64, seed=0)
    bc.distill(student, teacher, data, overrides={"train.batch_size": 16, "train.calibrate_batches": 1,
                                                  "distill.losses": ["hard"]},
               epochs=1, limit_batches=3, progress=False)  # a second batch used to fail in backward
    first = bc.evaluate(student, data)
    assert bc.evaluate(student, data) == first  # deterministic: no state survives a batch
    x = torch.rand((4,) + teacher.input_shape)
    res = export_model(student.eval(), "onnx", tmp_path / "loop.onnx", example_input=x)
    v = res.verification
    assert v is not None and v.passed and v.max_abs_diff < 1e-4 and v.flipped_fraction == 0.0
