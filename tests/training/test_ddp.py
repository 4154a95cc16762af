"""Distributed data parallel on CPU: `torchrun --nproc-per-node 2 -m bestcompress distill ...` (gloo) finishes,
and rank 0 alone writes files and prints."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from bestcompress.convert import binarize
from bestcompress.checkpoint import save_binary
from bestcompress.loading import load_binary
from bestcompress.training.run_state import read_metrics
from bestcompress.zoo import create_model

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_processes_rank0_writes(tmp_path):
    torch.manual_seed(0)
    source = create_model("spikformer_cifar", img_size=8, embed_dims=16, num_heads=2, depths=1, T=2)
    save_binary(binarize(source, "bestformer").model, source, tmp_path / "bin.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bestcompress", "distill", "bin.pt", "--data", "synthetic", "--subset", "32", "--epochs", "2",
           "--limit-batches", "2", "--set", "train.batch_size=16", "--set", "distill.losses=[hard,feature]",
           "--no-progress", "-o", "out.pt"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"], proc.stdout  # printed once, by rank 0
    metrics = read_metrics(tmp_path / "runs" / "bin" / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]  # one line per epoch: only rank 0 appended
    assert sorted(p.name for p in (tmp_path / "runs" / "bin").iterdir()) == ["last.pt", "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin.pt", "out.pt", "runs"]  # no stray temporary files
    state = torch.load(tmp_path / "runs" / "bin" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["epoch"] == 2
    binary, _, info = load_binary(tmp_path / "out.pt")
    assert info["extra"]["trained_by"] == "distill"
