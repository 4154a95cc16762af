"""Head fit: the binary model's full-precision heads fitted by least squares to the full-precision model's heads
(calibration with a teacher, recipe train.fit_heads). The fit solves the ridge regression it states, reaches both
heads of a coupled model (the second to the teacher's head of the same shape), brings the 0-epoch logits closer to
the teacher's on held-out samples than BatchNorm/λ calibration alone, changes nothing but the heads, and the recipe
switch reaches distill. (Accuracy gains are measured by benchmarks/ablation_cie.py on MNIST-1D.)"""
from __future__ import annotations

import torch
from torch import fx, nn

from bestcompress.convert import binarize
from bestcompress.nn.head_fit import fit_heads, output_linears
from bestcompress.training.calibration import calibrate
from bestcompress.training.outputs import mean_logits
from bestcompress.training.trainer import distill


def test_fit_is_the_ridge_solution_on_a_linear_model():
    """Student features = a fixed distortion of the teacher's: the fitted head reproduces the teacher's outputs
    (ridge ~0: exact up to float64 rounding)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    student = fx.symbolic_trace(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    student.get_submodule("0").load_state_dict(teacher[0].state_dict())
    assert output_linears(student) == ["2"]
    xs = [torch.randn(32, 6) for _ in range(4)]
    assert fit_heads(student, teacher, xs, ridge=1e-12) == 1
    x = torch.randn(16, 6)
    torch.testing.assert_close(student(x), teacher(x), atol=1e-4, rtol=1e-4)


def test_an_untraced_model_or_no_batch_fits_nothing():
    teacher = nn.Sequential(nn.Linear(4, 2))
    assert fit_heads(nn.Sequential(nn.Linear(4, 2)), teacher, [torch.randn(4, 4)]) == 0
    student = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2)))
    w = student.get_submodule("0").weight.clone()
    assert fit_heads(student, teacher, []) == 0
    assert torch.equal(student.get_submodule("0").weight, w)


def _gap(student, teacher, x):
    """Mean squared logit difference to the teacher and the fraction of samples where both pick the same class."""
    with torch.no_grad():
        s, t = mean_logits(student(x), True), teacher(x)
    return float(((s - t) ** 2).mean()), float((s.argmax(1) == t.argmax(1)).float().mean())


def test_fit_brings_a_coupled_models_logits_to_the_teachers_and_touches_only_the_heads(teacher_and_data):
    teacher, data = teacher_and_data
    held_out = data.test.tensors[0]  # not among the calibration batches (training set)
    student = binarize(teacher, "bestformer").model
    heads = output_linears(student)
    assert len(heads) == 2  # head and the couplings' head2
    calibrate(student, data, batches=4, batch_size=64)
    mse0, agree0 = _gap(student, teacher, held_out)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    done = calibrate(student, data, batches=4, batch_size=64, teacher=teacher)
    assert done.heads == 2 and "2 heads fitted" in done.note()
    mse1, agree1 = _gap(student, teacher, held_out)
    assert mse1 < 0.6 * mse0 and agree1 >= agree0, (mse0, mse1, agree0, agree1)
    for k, v in student.state_dict().items():
        if k.split(".")[0] in {h.split(".")[0] for h in heads} and k.rsplit(".", 1)[-1] in ("weight", "bias") \
                and any(k.startswith(h + ".") for h in heads):
            assert not torch.equal(v, before[k]), k
        elif "running_" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k


def test_recipe_switch_fits_the_heads_at_the_start_of_distill(teacher_and_data):
    teacher, data = teacher_and_data
    said = []
    student = binarize(teacher, "bestformer").model
    distill(student, teacher, data, "bestformer", epochs=1, log=said.append, progress=False, limit_batches=1,
            overrides={"train.fit_heads": True, "train.calibrate_batches": 2, "train.val_fraction": 0.0})
    assert any("heads fitted to the full-precision model's" in str(s) for s in said), said
