"""The best epoch is picked on the validation set (carved from the training set, never trained on, never the
test set; a tie goes to the later epoch), kept in the returned and saved model, while last.pt keeps the last
epoch."""
from __future__ import annotations

import torch
from torch import nn

from bestcompress.data import load_dataset
from bestcompress.loading import load_model
from bestcompress.training.run_state import read_metrics
from bestcompress.training.trainer import train
from bestcompress.zoo import create_model


def _rows(t: torch.Tensor) -> set:
    return {tuple(r.tolist()) for r in t.flatten(1)}


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def test_best_epoch_is_the_one_kept_and_saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("spikformer_seq", seq_len=20, embed_dims=32, num_heads=2, depths=1, T=2)
    data = load_dataset("synthetic", model, num_classes=5, subset=256)  # labels 0..4 of the model's 10 classes
    snapshots, broken = {}, []
    # After epoch 1 a hook (not a weight) makes the model answer class 9, which no sample has: later epochs score
    # 0 % on validation, so epoch 1 must be the one kept.
    model.head.register_forward_hook(lambda mod, args, out: out + torch.nn.functional.one_hot(
        torch.full((out.shape[0],), 9), out.shape[1]) * 1e4 if broken else None)

    def log(line):
        if line.startswith("epoch "):
            epoch = int(line.split()[1].split("/")[0])
            snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
            broken.append(True)

    over = {"train.batch_size": 32, "train.lr": 5e-3, "train.warmup_epochs": 0, "train.val_fraction": 0.25}
    result = train(model, data, "bestformer", tmp_path / "fp.pt", epochs=3, overrides=over, run_dir=tmp_path / "run",
                   log=log)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    vals = [m["val_top1"] for m in metrics]
    assert vals[1:] == [0.0, 0.0] and vals[0] > 0, vals  # the hook worked: epoch 1 is the best on validation
    assert result.best_epoch == 1 and metrics[-1]["best_epoch"] == 1 and result.best_top1 == vals[0]
    saved = load_model(tmp_path / "fp.pt").state_dict()
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert any(not torch.equal(snapshots[1][k], snapshots[3][k]) for k in snapshots[1])
    for k in snapshots[1]:
        assert torch.equal(saved[k], snapshots[1][k]), k
        assert torch.equal(result.model.state_dict()[k], snapshots[1][k]), k
        assert torch.equal(last["model"][k], snapshots[3][k]), k
    assert last["epoch"] == 3 and last["best"]["epoch"] == 1


def test_a_tie_on_validation_goes_to_the_later_epoch(tmp_path):
    torch.manual_seed(0)
    model = create_model("spikformer_seq", seq_len=20, embed_dims=32, num_heads=2, depths=1, T=2)
    data = load_dataset("synthetic", model, num_classes=5, subset=128)
    # every epoch answers class 9, which no sample has: all score 0 % on validation, a tie the last epoch wins
    model.head.register_forward_hook(lambda mod, args, out: out + torch.nn.functional.one_hot(
        torch.full((out.shape[0],), 9), out.shape[1]) * 1e4)
    over = {"train.batch_size": 32, "train.warmup_epochs": 0, "train.val_fraction": 0.25}
    result = train(model, data, "bestformer", epochs=3, overrides=over, run_dir=tmp_path / "run", log=lambda *_: None)
    vals = [m["val_top1"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert vals == [0.0, 0.0, 0.0]
    assert result.best_epoch == 3


def test_validation_samples_are_never_trained_on(tmp_path):
    data = load_dataset("synthetic", input_shape=(3, 8, 8), num_classes=10, subset=120)
    model = linear()
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()) if mod.training else None)
    train(model, data, "bestformer", epochs=2, overrides={"train.batch_size": 16, "train.val_fraction": 0.25},
          log=lambda *a: None)
    trained_on = _rows(torch.cat(seen))
    from bestcompress.data import validation_split
    split = validation_split(data, 0.25, seed=0)  # the trainer's split (same fraction and seed)
    assert len(trained_on) == len(split.train) == 90
    assert not trained_on & _rows(split.val.tensors[0])
    assert not _rows(split.val.tensors[0]) & _rows(data.test.tensors[0])
