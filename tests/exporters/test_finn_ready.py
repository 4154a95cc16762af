"""The FINN-ready graph's one-pass constant folding (finn_ready.fold_constants) gives qonnx's FoldConstants graph
byte for byte, on a real FINN-ready graph with integer LIF membranes."""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from .conftest import tiny_binary

pytestmark = pytest.mark.skipif(importlib.util.find_spec("finn") is None,
                                reason="FINN+ (the [finn] extra) is not installed")


def test_one_pass_folding_gives_qonnxs_graph(monkeypatch):
    from bestcompress.exporters import finn_ready

    model, _ = tiny_binary("spikformer_cifar")
    x = torch.rand((1,) + tuple(model.bc_input_shape), generator=torch.Generator().manual_seed(0))
    counts = []
    fold = finn_ready.fold_constants

    def counting(m):
        counts.append(fold(m))
        return counts[-1]

    graphs = []
    for folding in (counting, lambda m: 0):  # ours, then qonnx's FoldConstants alone
        monkeypatch.setattr(finn_ready, "fold_constants", folding)
        random.seed(0)  # qonnx draws random tensor names
        graphs.append(finn_ready.finn_ready_graph(model, x)[0].model.SerializeToString(deterministic=True))
    assert counts and counts[0] > 0  # it folded nodes (Slice/Concat arithmetic of reshapes, here)
    assert graphs[0] == graphs[1]
