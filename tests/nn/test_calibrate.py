"""Calibration: BatchNorm recalibration and attention-map scales make a freshly binarized model usable before any
training, change no other weight, restore the BatchNorm momenta, and the binarize command offers it (--calibrate)."""
from __future__ import annotations

import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.nn.calibrate import make_it_fire, recalibrate_batchnorm
from bestcompress.training.calibration import calibrate
from bestcompress.training.trainer import evaluate
from bestcompress.zoo import create_model

SEQ = dict(seq_len=20, embed_dims=32, num_heads=2, depths=1, T=2)  # as the teacher_and_data fixture (conftest.py)


def _weights(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" not in k and "num_batches" not in k}


def test_calibration_raises_zero_epoch_accuracy_and_changes_no_weight(teacher_and_data):
    teacher, data = teacher_and_data
    fp = evaluate(teacher, data)["top1"]
    student = binarize(teacher, "bestformer", overrides={"reversible.enabled": False}).model
    before = evaluate(student, data)["top1"]
    weights = _weights(student)
    momenta = [m.momentum for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen, layers, scales, heads, streams = calibrate(student, data, batches=4, batch_size=64)
    after = evaluate(student, data)["top1"]
    assert seen == 256 and layers == len(momenta) > 0 and scales == SEQ["depths"] and heads == 0 and streams == 0
    assert fp > 40.0  # the teacher learnt something, so the comparison means something
    assert after >= before + 10.0, (before, after, fp)
    assert after >= 0.5 * fp
    for k, v in weights.items():
        if k.endswith(".lam"):
            assert not torch.equal(student.state_dict()[k], v), k  # the attention-map scales were set
        else:
            assert torch.equal(student.state_dict()[k], v), k  # only running statistics moved
    assert [m.momentum for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == momenta
    assert not student.training


def test_running_statistics_are_the_average_over_the_batches():
    """momentum=None: the running mean is the plain average of the batch means, whatever the old statistics."""
    bn = nn.BatchNorm1d(3, momentum=0.3)
    bn.running_mean.fill_(100.0)
    model = nn.Sequential(nn.Linear(3, 3, bias=False), bn, nn.Dropout(0.9))
    nn.init.eye_(model[0].weight)
    batches = [torch.randn(8, 3, generator=torch.Generator().manual_seed(i)) + i for i in range(3)]
    assert recalibrate_batchnorm(model, batches) == 24
    expected = torch.stack([b.mean(0) for b in batches]).mean(0)
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)
    assert bn.momentum == 0.3 and not model[2].training


def test_nothing_seen_keeps_the_old_statistics():
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(5.0)
    assert recalibrate_batchnorm(nn.Sequential(bn), []) == 0
    assert torch.equal(bn.running_mean, torch.full((2,), 5.0))


def test_make_it_fire_makes_a_fresh_model_spike():
    from bestcompress.nn.lif import LIF
    torch.manual_seed(0)
    model = create_model("spikformer_seq", **SEQ)
    rates = []
    hooks = [m.register_forward_hook(lambda mod, i, out: rates.append(float(out.float().mean())))
             for m in model.modules() if isinstance(m, LIF)]
    make_it_fire(model, (1, 20), batches=2)
    rates.clear()
    with torch.no_grad():
        model(torch.rand(4, 1, 20))
    for h in hooks:
        h.remove()
    assert rates and sum(r > 0 for r in rates) >= len(rates) // 2


def test_attention_scales_carry_the_real_maps_mass(teacher_and_data):
    """With binary attention maps only (weights kept), λ·B has the real map's mass per step and head, and the
    calibrated model is not less accurate than with λ = 1 (the gain on a real task is in
    benchmarks/results/ablation_cie.md; this tiny synthetic task barely needs its attention)."""
    from bestcompress.nn.calibrate import attention_map_pairs
    teacher, data = teacher_and_data
    student = binarize(teacher, "bestformer", overrides={"reversible.enabled": False,
                                                        "weights.binarize": False}).model
    pairs = attention_map_pairs(student)
    assert len(pairs) == SEQ["depths"]
    calibrate(student, data, batches=2, batch_size=64)  # BatchNorm first, as in the full calibration
    for scale, _ in pairs:
        with torch.no_grad():
            scale.lam.fill_(1.0)
    before = evaluate(student, data)["top1"]
    calibrate(student, data, batches=2, batch_size=64)
    after = evaluate(student, data)["top1"]
    seen = []
    handles = [n.register_forward_hook(lambda m, a, o, s=s: seen.append((s, a[0], o))) for s, n in pairs]
    x = next(iter(torch.utils.data.DataLoader(data.train, batch_size=64)))[0]
    student.eval()
    with torch.no_grad():
        student(data.encode(x, torch.Generator().manual_seed(0)))
    for h in handles:
        h.remove()
    for scale, m, b in seen:
        shape = (scale.time_steps, -1, scale.heads) + tuple(m.shape[-2:])
        real, binary = m.reshape(shape).sum((1, 3, 4)), b.reshape(shape).sum((1, 3, 4))
        assert ((binary > 0) & (scale.lam.detach().flatten().reshape(real.shape) != 1.0)).any()
        ratio = (scale.lam.detach().reshape(real.shape) * binary) / real
        assert torch.all((ratio[binary > 0] - 1).abs() < 0.35), ratio  # a batch of the 128 calibration samples
    assert after >= before - 2.0, (before, after)
