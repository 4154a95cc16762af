"""last.pt records every option that shapes a run; --resume restores them, refuses different ones, and
tolerates a torn last line in metrics.jsonl."""
from __future__ import annotations

import pytest
import torch

from bestcompress.errors import CheckpointError
from bestcompress.training.run_state import read_metrics, resume_options
from bestcompress.training.trainer import train
from bestcompress.zoo import create_model

TINY = dict(img_size=8, embed_dims=16, num_heads=2, depths=1, T=2)
OPTIONS = dict(epochs=2, seed=3, subset=40, limit_batches=2, overrides={"train.batch_size": 8, "train.lr": 2e-3})


class Interrupt(Exception):
    pass


def tiny():
    torch.manual_seed(0)
    return create_model("spikformer_cifar", **TINY)


def crash_after_first_epoch(line):
    if line.startswith("epoch 1/"):
        raise Interrupt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run stopped after epoch 1 (its folder)."""
    root = tmp_path_factory.mktemp("runs")
    full = train(tiny(), "synthetic", "bestformer", run_dir=root / "full", log=lambda *a: None, **OPTIONS)
    with pytest.raises(Interrupt):
        train(tiny(), "synthetic", "bestformer", run_dir=root / "cut", log=crash_after_first_epoch, **OPTIONS)
    return full, root / "cut" / "last.pt"


def test_last_pt_records_the_options(runs):
    _, last = runs
    options = torch.load(last, weights_only=True)["options"]
    assert {k: options[k] for k in ("epochs", "seed", "data", "encoding", "subset", "limit_batches")} == \
        {"epochs": 2, "seed": 3, "data": "synthetic", "encoding": "direct", "subset": 40, "limit_batches": 2}
    assert options["recipe"]["train"]["batch_size"] == 8 and options["recipe"]["train"]["lr"] == 2e-3


def test_resume_with_no_options_restores_them_and_ends_where_the_full_run_ends(runs, tmp_path):
    full, last = runs
    (tmp_path / "cut").mkdir()
    copy = tmp_path / "cut" / "last.pt"
    copy.write_bytes(last.read_bytes())
    (tmp_path / "cut" / "metrics.jsonl").write_text((last.parent / "metrics.jsonl").read_text()
                                                     + '{"epoch": 2, "train_lo')  # torn by a kill
    assert len(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 1
    resumed = train(tiny(), resume=copy, log=lambda *a: None)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["epoch"] for m in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [1, 2]


def test_conflicting_options_are_named(runs):
    _, last = runs
    with pytest.raises(CheckpointError, match=r"epochs \(5, the run has 2\); seed \(4, the run has 3\)"):
        train(tiny(), resume=last, epochs=5, seed=4, log=lambda *a: None)
    with pytest.raises(CheckpointError, match=r"recipe key train.lr \(0.1, the run has 0.002\)"):
        train(tiny(), resume=last, overrides={"train.lr": 0.1}, log=lambda *a: None)
    with pytest.raises(CheckpointError, match=r"data \('digits', the run has 'synthetic'\)"):
        train(tiny(), "digits", resume=last, log=lambda *a: None)
    # options given again with the run's own values are fine
    assert resume_options({"epochs": 2, "seed": 3}, {"epochs": 2, "seed": None}, last)["seed"] == 3


def test_a_corrupt_line_inside_the_log_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"epoch": 1}\nxx\n{"epoch": 2}\n')
    with pytest.raises(CheckpointError, match="line 2 is not a JSON record"):
        read_metrics(tmp_path / "m.jsonl")
