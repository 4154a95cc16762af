"""`bestcompress train / distill / evaluate` through click's CliRunner on a tiny model and a digits subset."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bestcompress.loading import load_binary, load_model
from bestcompress.training.run_state import read_metrics
from tests.cli_helpers import assert_user_error, invoke

KW = "img_size=8,embed_dims=16,num_heads=2,depths=1,T=2"
QUICK = ["--subset", "48", "--limit-batches", "2", "--set", "train.batch_size=16", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """fp.pt from `train`, bin.pt from `binarize`, in one folder."""
    root = tmp_path_factory.mktemp("cli")
    r = invoke("train", "--arch", "spikformer_cifar", "--model-kwargs", KW, "--data", "digits", "--epochs", "1",
               *QUICK, "--run-dir", root / "runs" / "fp", "-o", root / "fp.pt")
    assert r.exit_code == 0, r.output
    assert "Saved" in r.output and "epoch 1/1" in r.output
    r = invoke("binarize", root / "fp.pt", "-o", root / "bin.pt")
    assert r.exit_code == 0, r.output
    return root


def test_train_output_and_run_folder(trained):
    model = load_model(trained / "fp.pt")
    assert model.bc_spec["arch"] == "spikformer_cifar" and model.embed_dims == 16
    assert len(read_metrics(trained / "runs" / "fp" / "metrics.jsonl")) == 1


def test_distill_resume_and_evaluate(trained):
    run = trained / "runs" / "bin"
    out = trained / "bin_cie.pt"
    r = invoke("distill", trained / "bin.pt", "--data", "digits", "--epochs", "2", *QUICK, "--run-dir", run,
               "-o", out)  # teacher: the FP source recorded in bin.pt
    assert r.exit_code == 0, r.output
    assert "head2" in r.output and out.exists()
    first = next(line for line in r.output.splitlines() if line.startswith("distill:"))
    assert "spikformer_cifar (binary)" in first and "on 'digits'" in first and "for 2 epochs" in first
    assert "recalibrated" in r.output and "kept best epoch" in r.output
    # a finished run resumed with no options: they come from last.pt (no --data needed), no epoch is left to run
    r = invoke("distill", trained / "bin.pt", "--resume", run / "last.pt", "--no-progress", "-o", out)
    assert r.exit_code == 0, r.output
    epochs_run = [line.split()[1] for line in r.output.splitlines() if line.startswith("epoch ")]
    assert "resumed from" in r.output and "after epoch 2/2" in r.output and epochs_run == []
    assert [m["epoch"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2]
    binary, source, info = load_binary(out)
    assert info["extra"]["epochs"] == 2
    r = invoke("distill", trained / "bin.pt", "--teacher", trained / "fp.pt", "--data", "digits", "--epochs", "3",
               "--resume", run / "last.pt", "-o", out)  # same teacher weights: only the epochs conflict
    assert_user_error(r, "epochs (3, the run has 2)")
    r = invoke("evaluate", out, "--data", "digits", "--subset", "48")
    assert r.exit_code == 0, r.output
    assert "top-1" in r.output and "head2 (last MLP stream)" in r.output
    r = invoke("evaluate", trained / "fp.pt", "--data", "digits", "--subset", "48", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["kind"] == "fp" and result["n"] == 48 and 0 <= result["top1"] <= 100


def test_train_with_poisson_encoding(tmp_path):
    r = invoke("train", "--arch", "spikformer_cifar", "--model-kwargs", KW, "--data", "digits", "--encoding",
               "poisson", "--epochs", "1", *QUICK, "--run-dir", tmp_path / "run", "-o", tmp_path / "ev.pt")
    assert r.exit_code == 0, r.output
    assert load_model(tmp_path / "ev.pt").input_mode == "events"
    r = invoke("evaluate", tmp_path / "ev.pt", "--data", "digits", "--encoding", "poisson", "--subset", "16")
    assert r.exit_code == 0, r.output


def test_bad_inputs_are_one_sentence(trained, tmp_path):
    assert_user_error(invoke("train", "--arch", "spikformer_cifar", "--model-kwargs", KW, "--data",
                             tmp_path / "missing", "-o", tmp_path / "x.pt"), "neither a built-in data set")
    np.savez(tmp_path / "bad.npz", x=np.zeros((8, 3, 8, 8), np.float32), y=np.arange(8) + 5)
    assert_user_error(invoke("train", "--arch", "spikformer_cifar", "--model-kwargs", KW, "--data",
                             tmp_path / "bad.npz", "-o", tmp_path / "x.pt"), "out of range")
    assert_user_error(invoke("train", "--data", "digits"), "--arch")
    assert_user_error(invoke("train", "--arch", "spikformer_cifar", "--data", "digits", "-o",
                             tmp_path / "no" / "x.pt"), "does not exist")
    assert_user_error(invoke("distill", trained / "fp.pt", "--data", "digits"), "not a binary one")
    assert_user_error(invoke("distill", trained / "bin.pt", "--data", "mnist1d", "--run-dir", tmp_path / "r"),
                      "model takes")
    assert_user_error(invoke("distill", trained / "bin.pt", "--data", "digits", "--resume", trained / "fp.pt"),
                      "not a training-run checkpoint")
    assert_user_error(invoke("distill", trained / "bin.pt", "--data", "digits", "--teacher-arch", "spikformer_cifar"),
                      "--teacher FILE")
    assert_user_error(invoke("evaluate", tmp_path / "none.pt", "--data", "digits"), "does not exist")


def test_binarize_calibrate(trained, tmp_path):
    r = invoke("binarize", trained / "fp.pt", "--calibrate", "digits", "--calibrate-batches", "2",
               "--no-fit-heads", "-o", tmp_path / "cal.pt")
    assert r.exit_code == 0, r.output
    assert "BatchNorm statistics of" in r.output and "128 training samples of 'digits'" in r.output
    plain, _, _ = load_binary(trained / "bin.pt")
    calibrated, _, _ = load_binary(tmp_path / "cal.pt")
    a, b = plain.state_dict(), calibrated.state_dict()
    moved = [k for k in a if "running_mean" in k and not torch.equal(a[k], b[k])]
    assert moved
    scales = [k for k in a if k.endswith(".lam")]
    assert scales and any(not torch.equal(a[k], b[k]) for k in scales)  # the attention-map scales were set
    for k in a:
        if "running_" not in k and "num_batches" not in k and not k.endswith(".lam"):
            assert torch.equal(a[k], b[k]), k
    r = invoke("binarize", trained / "fp.pt", "--calibrate", "digits", "--calibrate-batches", "2",
               "-o", tmp_path / "fit.pt")  # the heads are fitted by default
    assert r.exit_code == 0, r.output
    assert "heads fitted to the full-precision model's" in r.output
    fitted, _, _ = load_binary(tmp_path / "fit.pt")
    c = fitted.state_dict()
    changed = {k for k in a if "running_" not in k and "num_batches" not in k and not torch.equal(b[k], c[k])}
    assert changed and all(k.rsplit(".", 2)[-2].startswith("head") for k in changed), changed  # only the heads
    assert_user_error(invoke("binarize", trained / "fp.pt", "--calibrate", tmp_path / "none", "-o",
                             tmp_path / "x.pt"), "neither a built-in data set")
    assert not (tmp_path / "x.pt").exists()


NAN_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, mode="ok"):
        super().__init__()
        self.mode = mode
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        broken = self.mode == ("train_nan" if self.training else "eval_nan")
        return y * float("nan") if broken else y


def build(mode="ok"):
    return Net(mode)
'''


def test_non_finite_loss_and_outputs_exit_2(tmp_path):
    (tmp_path / "nan_model.py").write_text(NAN_MODEL)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((40, 1, 6), np.float32), y=np.arange(40) % 3)
    factory, data = f"{tmp_path / 'nan_model.py'}:build", tmp_path / "d.npz"
    r = invoke("train", "--model", factory, "--model-kwargs", "mode=train_nan", "--data", data, "--epochs", "2",
               "--no-progress", "--run-dir", tmp_path / "run", "-o", tmp_path / "nan.pt")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "Training stopped at epoch 1, step 1: the loss (nan) is not finite" in r.output
    assert not (tmp_path / "nan.pt").exists()
    r = invoke("train", "--model", factory, "--data", data, "--epochs", "1", "--no-progress", "--run-dir",
               tmp_path / "run2", "-o", tmp_path / "ok.pt")
    assert r.exit_code == 0, r.output
    assert_user_error(invoke("evaluate", tmp_path / "ok.pt", "--model", factory, "--model-kwargs", "mode=eval_nan",
                             "--data", data), "not finite (NaN or Inf) on 8 of 8 test samples")
