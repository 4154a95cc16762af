"""Bad input, over every command: exit code 2, one sentence on stderr, no traceback, nothing written, inputs intact.

Each case runs one command in a folder of fixture files (built once for the module from tiny zoo models) and
checks, besides the one-sentence error (tests/cli_helpers.assert_user_error): no file in the folder is new,
gone or changed (names and SHA-256 of every file, links included), so inputs are byte-identical and no partial
output, temporary file or run folder is left behind.
"""
from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from bestcompress.checkpoint import save_binary, save_fp
from bestcompress.convert import binarize
from bestcompress.exporters.packed import save_packed
from bestcompress.zoo import tiny_model
from tests.cli_helpers import assert_user_error, invoke

READ_ONLY = "/sys"  # a folder even root cannot create files in


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    fp = tiny_model("spikformer_cifar").eval()
    save_fp(fp, d / "fp.pt")
    binary = binarize(fp).model
    save_binary(binary, fp, d / "bin.pt")
    save_packed(binary, d / "good.bcz")
    other = tiny_model("spikformer_cifar", num_classes=5).eval()
    save_binary(binarize(other).model, other, d / "other_bin.pt")
    torch.save(fp.state_dict(), d / "sd.pt")
    torch.save(nn.Sequential(nn.Linear(2, 2)), d / "pickled.pt")
    (d / "notes.txt").write_text("not a checkpoint\n")
    (d / "empty.pt").write_bytes(b"")
    raw = (d / "fp.pt").read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    bcz = (d / "good.bcz").read_bytes()
    (d / "truncated.bcz").write_bytes(bcz[: len(bcz) // 2])
    with zipfile.ZipFile(d / "good.bcz") as z:
        info = z.getinfo("header.npy")
    flipped = bytearray(bcz)
    flipped[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF  # inside its data
    (d / "corrupt.bcz").write_bytes(bytes(flipped))
    with zipfile.ZipFile(d / "good.bcz") as z:
        blob = next(i for i in z.infolist() if i.filename.startswith("blob_"))
    flipped = bytearray(bcz)
    flipped[blob.header_offset + 30 + len(blob.filename) + blob.compress_size // 2] ^= 0xFF
    (d / "corrupt_blob.bcz").write_bytes(bytes(flipped))
    nan_fp = tiny_model("spikformer_cifar").eval()
    with torch.no_grad():
        nan_fp.head.weight[0, 0] = float("nan")
    save_fp(nan_fp, d / "nan_fp.pt")
    nan_bin = binarize(fp).model
    with torch.no_grad():
        dict(nan_bin.named_parameters())["head.weight"][0, 0] = float("inf")
    save_binary(nan_bin, fp, d / "nan_bin.pt")
    (d / "unknown_key.yaml").write_text("weights:\n  binarise: true\n")
    (d / "lr0.yaml").write_text("train:\n  lr: 0\n")
    (d / "models.py").write_text("def broken():\n    raise ValueError('no')\n")
    np.savez(d / "wrong.npz", x=np.zeros((4, 1, 5, 5), np.float32))
    (d / "sub").mkdir()
    os.symlink("fp.pt", d / "link.pt")
    os.link(d / "fp.pt", d / "hard.pt")
    return d


def snapshot(folder) -> dict:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[rel] = "dir"
    return out


RO = f"{READ_ONLY}/out.pt"
SYN = ["--data", "synthetic", "--epochs", "1", "--limit-batches", "1"]

CASES = {
    # ------------------------------------------------------------------------------------------ binarize
    "binarize-missing": (["binarize", "nope.pt", "-o", "b.pt"], ["does not exist"]),
    "binarize-empty": (["binarize", "empty.pt", "-o", "b.pt"], ["empty"]),
    "binarize-text": (["binarize", "notes.txt", "-o", "b.pt"], ["not a PyTorch checkpoint"]),
    "binarize-truncated": (["binarize", "truncated.pt", "-o", "b.pt"], ["truncated or corrupted"]),
    "binarize-output-is-input": (["binarize", "fp.pt", "-o", "fp.pt"], ["is the input"]),
    "binarize-output-dot-slash": (["binarize", "fp.pt", "-o", "./fp.pt"], ["is the input"]),
    "binarize-output-symlink": (["binarize", "fp.pt", "-o", "link.pt"], ["is the input"]),
    "binarize-output-hardlink": (["binarize", "fp.pt", "-o", "hard.pt"], ["is the input"]),
    "binarize-output-is-recipe": (["binarize", "fp.pt", "--recipe", "lr0.yaml", "-o", "lr0.yaml"], []),
    "binarize-output-folder-missing": (["binarize", "fp.pt", "-o", "nodir/b.pt"], ["does not exist"]),
    "binarize-output-is-folder": (["binarize", "fp.pt", "-o", "sub"], ["sub"]),
    "binarize-output-read-only": (["binarize", "fp.pt", "-o", RO], ["Cannot write"]),
    "binarize-recipe-unknown": (["binarize", "fp.pt", "--recipe", "nope", "-o", "b.pt"], ["Unknown recipe"]),
    "binarize-recipe-unknown-key": (["binarize", "fp.pt", "--recipe", "unknown_key.yaml", "-o", "b.pt"],
                                    ["unknown key 'weights.binarise'"]),
    "binarize-recipe-lr0": (["binarize", "fp.pt", "--recipe", "lr0.yaml", "-o", "b.pt"], ["train.lr"]),
    "binarize-set-unknown": (["binarize", "fp.pt", "--set", "weights.nope=1", "-o", "b.pt"], ["weights.nope"]),
    "binarize-set-no-equals": (["binarize", "fp.pt", "--set", "weights.binarize", "-o", "b.pt"], ["key=value"]),
    "binarize-set-bad-list": (["binarize", "fp.pt", "--set", "weights.keep_full_precision=[first", "-o", "b.pt"],
                              ["not valid YAML"]),
    "binarize-set-bad-type": (["binarize", "fp.pt", "--set", "weights.binarize=maybe", "-o", "b.pt"],
                              ["true or false"]),
    "binarize-set-alpha": (["binarize", "fp.pt", "--set", "distill.alpha=2", "-o", "b.pt"], ["distill.alpha"]),
    "binarize-set-loss": (["binarize", "fp.pt", "--set", "distill.losses=[bogus]", "-o", "b.pt"], ["bogus"]),
    "binarize-set-batch": (["binarize", "fp.pt", "--set", "train.batch_size=0", "-o", "b.pt"], ["batch_size"]),
    "binarize-set-epochs": (["binarize", "fp.pt", "--set", "train.epochs=0", "-o", "b.pt"], ["train.epochs"]),
    "binarize-set-warmup": (["binarize", "fp.pt", "--set", "train.warmup_epochs=-1", "-o", "b.pt"], ["warmup"]),
    "binarize-shape-text": (["binarize", "fp.pt", "--input-shape", "abc", "-o", "b.pt"], ["--input-shape"]),
    "binarize-shape-zero": (["binarize", "fp.pt", "--input-shape", "0,16,16", "-o", "b.pt"], ["--input-shape"]),
    "binarize-shape-misfit": (["binarize", "fp.pt", "--input-shape", "1,16,16", "-o", "b.pt"],
                              ["--input-shape 1,16,16 does not fit"]),
    "binarize-arch-unknown": (["binarize", "sd.pt", "--arch", "resnet", "-o", "b.pt"], ["Unknown model"]),
    "binarize-arch-wrong": (["binarize", "sd.pt", "--arch", "spikformer_seq", "-o", "b.pt"], ["does not fit"]),
    "binarize-binary": (["binarize", "bin.pt", "-o", "b.pt"], ["already a binary"]),
    "binarize-packed": (["binarize", "good.bcz", "-o", "b.pt"], ["already a binary"]),
    "binarize-nan": (["binarize", "nan_fp.pt", "-o", "b.pt"], ["non-finite", "head.weight"]),
    "binarize-pickle": (["binarize", "pickled.pt", "-o", "b.pt"], ["pickled Python code"]),
    "binarize-factory-missing": (["binarize", "sd.pt", "--model", "nope.py:build", "-o", "b.pt"],
                                 ["does not exist"]),
    "binarize-factory-raises": (["binarize", "sd.pt", "--model", "models.py:broken", "-o", "b.pt"],
                                ["raised ValueError"]),
    "binarize-kwargs-json": (["binarize", "fp.pt", "--arch", "spikformer_cifar", "--model-kwargs", "{bad",
                              "-o", "b.pt"], ["not valid JSON"]),
    "binarize-threads-zero": (["binarize", "fp.pt", "--threads", "0", "-o", "b.pt"], ["--threads"]),
    # ------------------------------------------------------------------------------------------- inspect
    "inspect-missing": (["inspect", "nope.pt"], ["does not exist"]),
    "inspect-truncated-bcz": (["inspect", "truncated.bcz"], []),
    "inspect-corrupt-bcz": (["inspect", "corrupt.bcz"], ["corrupted"]),
    "inspect-corrupt-blob-bcz": (["inspect", "corrupt_blob.bcz"], ["corrupted"]),
    "inspect-shape-misfit": (["inspect", "fp.pt", "--input-shape", "1,16,16"], ["failed"]),
    "inspect-pickle": (["inspect", "pickled.pt"], ["pickled Python code", "--trust-checkpoint"]),
    "inspect-no-such-option": (["inspect", "fp.pt", "--bogus"], ["--bogus"]),
    # ------------------------------------------------------------------------------------------ evaluate
    "evaluate-device-bogus": (["evaluate", "fp.pt", "--data", "synthetic", "--device", "bogus"],
                              ["Unknown device 'bogus'"]),
    "evaluate-device-cuda": (["evaluate", "fp.pt", "--data", "synthetic", "--device", "cuda:7"], ["cuda:7"]),
    "evaluate-no-data": (["evaluate", "fp.pt"], ["--data"]),
    "evaluate-data-missing": (["evaluate", "fp.pt", "--data", "nodir/"], []),
    "evaluate-data-wrong-shape": (["evaluate", "fp.pt", "--data", "wrong.npz"], []),
    "evaluate-batch-zero": (["evaluate", "fp.pt", "--data", "synthetic", "--batch-size", "0"], ["--batch-size"]),
    "evaluate-corrupt-bcz": (["evaluate", "corrupt.bcz", "--data", "synthetic"], []),
    # --------------------------------------------------------------------------------------------- train
    "train-binary-init": (["train", "--init", "bin.pt", *SYN, "-o", "t.pt"], ["binary", "distill"]),
    "train-packed-init": (["train", "--init", "good.bcz", *SYN, "-o", "t.pt"], ["binary"]),
    "train-no-model": (["train", *SYN, "-o", "t.pt"], ["--arch"]),
    "train-arch-unknown": (["train", "--arch", "resnet", *SYN, "-o", "t.pt"], ["Unknown model"]),
    "train-output-is-init": (["train", "--init", "fp.pt", *SYN, "-o", "fp.pt"], ["is the input"]),
    "train-output-read-only": (["train", "--arch", "spikformer_cifar", "--tiny", *SYN, "-o", RO], ["Cannot write"]),
    "train-run-dir-read-only": (["train", "--arch", "spikformer_cifar", "--tiny", *SYN, "-o", "t.pt",
                                 "--run-dir", f"{READ_ONLY}/run"], ["Cannot write"]),
    "train-device-bogus": (["train", "--arch", "spikformer_cifar", "--tiny", *SYN, "--device", "tpu", "-o", "t.pt"],
                           ["Unknown device"]),
    "train-epochs-zero": (["train", "--arch", "spikformer_cifar", "--tiny", "--data", "synthetic", "--epochs", "0",
                           "-o", "t.pt"], ["--epochs"]),
    "train-tiny-no-arch": (["train", "--init", "fp.pt", "--tiny", *SYN, "-o", "t.pt"], ["--tiny"]),
    "train-set-lr": (["train", "--arch", "spikformer_cifar", "--tiny", *SYN, "--set", "train.lr=-1", "-o", "t.pt"],
                     ["train.lr"]),
    "train-set-structure": (["train", "--arch", "spikformer_cifar", "--tiny", *SYN, "--set", "weights.binarize=false",
                             "-o", "t.pt"], ["weights.binarize", "binarize"]),
    # ------------------------------------------------------------------------------------------- distill
    "distill-fp": (["distill", "fp.pt", *SYN, "-o", "c.pt"], ["full-precision"]),
    "distill-packed": (["distill", "good.bcz", *SYN, "-o", "c.pt"], [".bcz"]),
    "distill-output-is-input": (["distill", "bin.pt", *SYN, "-o", "bin.pt"], ["is the input"]),
    "distill-output-is-teacher": (["distill", "bin.pt", "--teacher", "fp.pt", *SYN, "-o", "hard.pt"],
                                  ["is the input"]),
    "distill-structure-reversible": (["distill", "bin.pt", *SYN, "--set", "reversible.enabled=false", "-o", "c.pt"],
                                     ["reversible.enabled"]),
    "distill-structure-attention": (["distill", "bin.pt", *SYN, "--set", "attention.map=kv", "-o", "c.pt"],
                                    ["attention.map"]),
    "distill-teacher-missing": (["distill", "bin.pt", "--teacher", "nope.pt", *SYN, "-o", "c.pt"],
                                ["does not exist"]),
    "distill-teacher-binary": (["distill", "bin.pt", "--teacher", "other_bin.pt", *SYN, "-o", "c.pt"],
                               ["already a binary"]),
    "distill-teacher-arch-alone": (["distill", "bin.pt", "--teacher-arch", "spikformer_cifar", *SYN, "-o", "c.pt"],
                                   ["--teacher"]),
    "distill-device-cuda": (["distill", "bin.pt", *SYN, "--device", "cuda", "-o", "c.pt"], ["cuda"]),
    "distill-set-alpha": (["distill", "bin.pt", *SYN, "--set", "distill.alpha=-0.5", "-o", "c.pt"],
                          ["distill.alpha"]),
    "distill-output-read-only": (["distill", "bin.pt", *SYN, "-o", RO], ["Cannot write"]),
    # -------------------------------------------------------------------------------------------- export
    "export-fp": (["export", "fp.pt", "-f", "packed", "-o", "x.bcz"], ["full-precision"]),
    "export-format-unknown": (["export", "bin.pt", "-f", "tflite", "-o", "x.bin"], ["tflite"]),
    "export-output-is-input": (["export", "bin.pt", "-f", "packed", "-o", "bin.pt"], ["is the input"]),
    "export-output-read-only": (["export", "bin.pt", "-f", "packed", "-o", f"{READ_ONLY}/x.bcz"], ["Cannot write"]),
    "export-output-folder-missing": (["export", "bin.pt", "-f", "packed", "-o", "nodir/x.bcz"], ["does not exist"]),
    "export-output-is-folder": (["export", "bin.pt", "-f", "qonnx", "-o", "sub"], ["folder"]),
    "export-tolerance-negative": (["export", "bin.pt", "-f", "packed", "-o", "x.bcz", "--tolerance", "-1"],
                                  ["--tolerance"]),
    "export-nan": (["export", "nan_bin.pt", "-f", "packed", "-o", "x.bcz"], ["non-finite", "head.weight"]),
    "export-corrupt-bcz": (["export", "corrupt.bcz", "-f", "onnx", "-o", "x.onnx"], []),
    "export-missing-format": (["export", "bin.pt", "-o", "x.bcz"], ["--format"]),
    # -------------------------------------------------------------------------------------------- verify
    "verify-missing": (["verify", "nope.onnx", "--against", "bin.pt"], ["does not exist"]),
    "verify-other-model": (["verify", "good.bcz", "--against", "other_bin.pt"], ["another model"]),
    "verify-tolerance-negative": (["verify", "good.bcz", "--against", "bin.pt", "--tolerance", "-1"],
                                  ["--tolerance"]),
    "verify-not-an-export": (["verify", "notes.txt", "--against", "bin.pt"], []),
    "verify-corrupt-bcz": (["verify", "corrupt.bcz", "--against", "bin.pt"], []),
    "verify-against-fp": (["verify", "good.bcz", "--against", "fp.pt"], ["full-precision"]),
    "verify-no-against": (["verify", "good.bcz"], ["--against"]),
    # ------------------------------------------------------------------------------------ recipes and zoo
    "recipes-show-unknown": (["recipes", "show", "nope"], ["Unknown recipe"]),
    "recipes-show-unknown-key": (["recipes", "show", "unknown_key.yaml"], ["weights.binarise"]),
    "recipes-show-lr0": (["recipes", "show", "lr0.yaml"], ["train.lr"]),
    "recipes-show-set-lr0": (["recipes", "show", "bestformer", "--set", "train.lr=0"], ["train.lr"]),
    "recipes-show-set-unknown": (["recipes", "show", "bestformer", "--set", "nope=1"], ["nope"]),
    "recipes-show-set-label-smoothing": (["recipes", "show", "bestformer", "--set", "distill.label_smoothing=1"],
                                         ["label_smoothing"]),
    "recipes-unknown-subcommand": (["recipes", "delete"], ["delete"]),
    "zoo-extra-argument": (["zoo", "spikformer"], []),
    "unknown-command": (["compress", "fp.pt"], ["compress"]),
    "unknown-group-option": (["--bogus", "zoo"], ["--bogus"]),
}


@pytest.mark.parametrize("args,needles", list(CASES.values()), ids=list(CASES))
def test_bad_input(folder, monkeypatch, args, needles):
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    result = invoke(*args)
    assert_user_error(result, *needles)
    assert snapshot(folder) == before, result.output


def test_there_are_at_least_60_cases_over_every_command():
    commands = {args[0] for args, _ in CASES.values()}
    assert len(CASES) >= 60
    assert {"binarize", "inspect", "evaluate", "train", "distill", "export", "verify", "recipes", "zoo"} <= commands


def test_the_fixtures_are_good_where_they_should_be(folder, monkeypatch):
    """The same files work with good options (so the cases above fail for the reason they name)."""
    monkeypatch.chdir(folder)
    result = invoke("recipes", "show", "bestformer", "--set", "train.lr=1e-3")
    assert result.exit_code == 0 and "lr: 0.001" in result.output, result.output
    result = invoke("verify", "good.bcz", "--against", "bin.pt")
    assert result.exit_code == 0, result.output
    result = invoke("inspect", "good.bcz")
    assert result.exit_code == 0 and "packed binary model" in result.output, result.output
    result = invoke("evaluate", "good.bcz", "--data", "synthetic", "--limit-batches", "1", "--json")
    assert result.exit_code == 0 and '"kind": "packed"' in result.output, result.output
