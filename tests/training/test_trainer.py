"""The trainer: files it writes, exact resume, distillation output, evaluation, schedule, bad input; the best epoch
(picked on validation) is the one kept; teacher logits cached; options restored on resume; non-finite stops."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.loading import load_binary, load_model
from bestcompress.data import load_dataset
from bestcompress.training.evaluation import neuron_reset_fn
from bestcompress.training.run_state import read_metrics
from bestcompress.training.trainer import distill, evaluate, make_optimizer, make_scheduler, train
from bestcompress.errors import CheckpointError, DataError
from bestcompress.recipe import load_recipe
from bestcompress.zoo import create_model

TINY = dict(img_size=8, embed_dims=16, num_heads=2, depths=1, T=2)
FAST = {"train.batch_size": 16, "train.warmup_epochs": 1, "train.lr": 2e-3}
TIME_KEYS = {"samples_per_s", "epoch_time_s"}


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("spikformer_cifar", **TINY)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", tiny(), subset=48)


def quiet(*_):
    pass


def test_train_writes_metrics_checkpoint_and_output(tmp_path, data):
    model = tiny()
    result = train(model, data, "bestformer", tmp_path / "fp.pt", epochs=2, overrides=FAST, run_dir=tmp_path / "run",
                   limit_batches=2, log=quiet)
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"train_loss", "train_top1", "val_top1", "test_top1", "best_epoch", "lr", "samples_per_s"} <= set(lines[0])
    assert lines[-1] == result.final
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)  # safe to load
    assert state["epoch"] == 2 and set(state["rng"]) >= {"torch", "numpy", "python"}
    assert state["options"]["epochs"] == 2 and state["options"]["recipe"]["train"]["batch_size"] == 16
    reloaded = load_model(tmp_path / "fp.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    assert evaluate(reloaded, data)["top1"] == pytest.approx(result.best["test_top1"])
    # the schedule ran its cosine down to min_lr
    assert result.final["lr"] == pytest.approx(load_recipe().train.min_lr)


class Interrupt(Exception):
    pass


def test_distill_resume_is_exact(tmp_path, data):
    """2 epochs uninterrupted == 1 epoch, crash, resume to 2 (weights and metrics identical)."""
    teacher = tiny(0)
    recipe_over = {**FAST, "distill.losses": ["hard", "feature"]}

    def student():
        torch.manual_seed(1)
        return binarize(teacher, "bestformer").model

    full = distill(student(), teacher, data, "bestformer", epochs=2, overrides=recipe_over,
                   run_dir=tmp_path / "a", limit_batches=3, log=quiet)

    def crash_after_first_epoch(line):
        if line.startswith("epoch 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(student(), teacher, data, "bestformer", epochs=2, overrides=recipe_over, run_dir=tmp_path / "b",
                limit_batches=3, log=crash_after_first_epoch)
    assert len(read_metrics(tmp_path / "b" / "metrics.jsonl")) == 1
    fresh = student()
    resumed = distill(fresh, teacher, data, "bestformer", epochs=2, overrides=recipe_over,
                      resume=tmp_path / "b" / "last.pt", limit_batches=3, log=quiet)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in full.metrics]
    assert "train_feature" in full.final and "train_hard" in full.final


def test_resume_rejects_other_files(tmp_path, data):
    torch.save({"a": torch.ones(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a training-run checkpoint"):
        train(tiny(), data, epochs=1, resume=tmp_path / "x.pt", log=quiet)


def test_distill_saves_binary_with_its_source_and_evaluates_heads(tmp_path, data):
    teacher = tiny(0)
    student = binarize(teacher, "bestformer").model
    result = distill(student, teacher, data, epochs=1, overrides=FAST, limit_batches=2, out=tmp_path / "bin.pt",
                     source_model=teacher, log=quiet)
    assert "test_top1_head" in result.final and "test_top1_head2" in result.final
    binary, source, info = load_binary(tmp_path / "bin.pt")
    assert info["extra"]["trained_by"] == "distill"
    for k, v in teacher.state_dict().items():
        assert torch.equal(source.state_dict()[k], v), k  # the teacher default survives
    scores = evaluate(binary, data)
    assert scores["top1"] == pytest.approx(result.best["test_top1"])
    assert {"top1_head", "top1_head2"} <= set(scores)


def test_distill_learns_from_teacher_only(data):
    """With alpha=1 and only the hard loss, the student is pulled to the teacher's predictions."""
    teacher = tiny(0)
    student = binarize(teacher, "bestformer", overrides={"reversible.enabled": False}).model
    over = {**FAST, "distill.losses": ["hard"], "distill.alpha": 1.0, "train.lr": 5e-3, "train.warmup_epochs": 0}
    result = distill(student, teacher, data, epochs=3, overrides=over, log=quiet)
    assert result.final["train_hard"] < result.metrics[0]["train_hard"]


def test_schedule_warmup_then_cosine():
    recipe = load_recipe("bestformer", {"train.lr": 1e-3, "train.min_lr": 1e-5, "train.warmup_epochs": 1})
    opt = make_optimizer(nn.Linear(2, 2), recipe)
    assert [g["weight_decay"] for g in opt.param_groups] == [recipe.train.weight_decay, 0.0]  # no decay on bias
    sched = make_scheduler(opt, recipe, steps_per_epoch=10, epochs=4)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))
    mid = 10 + 15
    assert lrs[mid] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 15 / 30)))


def test_stateful_neurons_are_reset_between_batches():
    from spikingjelly.activation_based import neuron
    model = nn.Sequential(nn.Linear(4, 4), neuron.LIFNode(step_mode="s"))
    reset = neuron_reset_fn(model)
    assert reset is not None
    model(torch.ones(3, 4))
    assert isinstance(model[1].v, torch.Tensor)
    reset()
    assert not isinstance(model[1].v, torch.Tensor) or float(model[1].v.abs().sum()) == 0


def test_model_that_does_not_take_the_data(data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 10))  # 3*8*8 inputs expected
    with pytest.raises(DataError, match="cannot run on 'synthetic' samples of shape"):
        train(model, data, epochs=1, log=quiet)
    small = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))  # labels reach 9
    with pytest.raises(DataError, match="out of range for a model with 3 outputs"):
        train(small, data, epochs=1, log=quiet)


def test_distill_refreshes_batchnorm_statistics_before_scoring_each_epoch(data):
    """With calibration on, the kept model's BatchNorm statistics are those of its own weights on the calibration
    batches (re-estimating them again changes nothing); with calibration off they are the running averages."""
    from bestcompress.data.split import validation_split
    from bestcompress.training.calibration import refresh_batchnorm
    teacher = tiny(1)

    def bn_stats(m):
        return {k: v.clone() for k, v in m.state_dict().items() if "running_" in k}

    for n in (2, 0):
        student = binarize(teacher, "bestformer", overrides={"reversible.enabled": False}).model
        over = {**FAST, "train.calibrate_batches": n, "train.val_fraction": 0.0}
        result = distill(student, teacher, data, "bestformer", epochs=1, overrides=over, log=quiet)
        before = bn_stats(result.model)
        refresh_batchnorm(result.model, validation_split(data, 0.0, 0), batches=2, batch_size=16, seed=0)
        after = bn_stats(result.model)
        same = all(torch.allclose(before[k], after[k], rtol=1e-5, atol=1e-6) for k in before)
        assert same == (n > 0), n
