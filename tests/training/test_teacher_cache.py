"""Teacher logits are computed once per training sample when the data has no random coding, and every epoch
when it has (Poisson spikes)."""
from __future__ import annotations

import torch

from bestcompress.convert import binarize
from bestcompress.data import load_dataset
from bestcompress.training.trainer import distill
from bestcompress.zoo import create_model

TINY = dict(img_size=8, embed_dims=16, num_heads=2, depths=1, T=2)
OVER = {"train.batch_size": 16, "distill.losses": ["hard"], "train.calibrate_batches": 0}


def _count_teacher_rows(teacher):
    rows = []
    teacher.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    return rows


def test_teacher_runs_once_per_sample_over_two_epochs():
    torch.manual_seed(0)
    teacher = create_model("spikformer_cifar", **TINY)
    data = load_dataset("synthetic", teacher, subset=48)
    student = binarize(teacher, "bestformer").model
    rows = _count_teacher_rows(teacher)
    result = distill(student, teacher, data, epochs=2, overrides=OVER, log=lambda *a: None)
    n_train = 48 - round(0.1 * 48)  # the rest is the validation set
    assert rows[0] == 2  # the fit check before training
    assert sum(rows[1:]) == n_train  # then each training sample once, although 2 epochs ran
    assert len(result.metrics) == 2


def test_random_coding_runs_the_teacher_every_epoch():
    torch.manual_seed(0)
    teacher = create_model("spikformer_cifar", **TINY, input_mode="events")
    data = load_dataset("synthetic", teacher, subset=48, encoding="poisson")
    student = binarize(teacher, "bestformer").model
    rows = _count_teacher_rows(teacher)
    distill(student, teacher, data, epochs=2, overrides=OVER, log=lambda *a: None)
    assert sum(rows[1:]) == 2 * (48 - round(0.1 * 48))
