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


def test_folding_in_waves_computes_as_qonnxs_graph(monkeypatch):
    """Quantized streams (bestformer_finn, FINN lowering): shape arithmetic that only InferShapes after a fold
    resolves, so folding runs in several waves; the graph holds the same nodes and computes the same logits."""
    from collections import Counter

    import numpy as np
    from qonnx.core.onnx_exec import execute_onnx

    from bestcompress.convert import binarize
    from bestcompress.exporters import finn_ready
    from bestcompress.nn.calibrate import make_it_fire
    from bestcompress.nn.stream_quant import finn_lowering
    from bestcompress.zoo import create_model, get_entry

    torch.manual_seed(0)
    source = create_model("spikformer_cifar", **get_entry("spikformer_cifar").tiny_cfg).eval()
    binary = binarize(source, "bestformer_finn").model
    model = make_it_fire(binary, binary.bc_input_shape, batches=2)
    x = torch.rand((1,) + tuple(model.bc_input_shape), generator=torch.Generator().manual_seed(0))
    waves = []
    fold = finn_ready.fold_constants
    graphs = []
    for folding in (lambda m: waves.append(fold(m)) or waves[-1], lambda m: 0):
        monkeypatch.setattr(finn_ready, "fold_constants", folding)
        random.seed(0)
        with finn_lowering():
            graphs.append(finn_ready.finn_ready_graph(model, x)[0])
    assert len(waves) > 2 and waves[0] > 0 and waves[-1] == 0
    ours, theirs = graphs
    assert Counter(n.op_type for n in ours.graph.node) == Counter(n.op_type for n in theirs.graph.node)
    feed = x.numpy()
    got = execute_onnx(ours, {ours.graph.input[0].name: feed})["global_out"]
    want = execute_onnx(theirs, {theirs.graph.input[0].name: feed})["global_out"]
    assert np.array_equal(got, want)
