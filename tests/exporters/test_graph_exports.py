"""QONNX and standard-ONNX exports of every zoo family: exact, binary weights as BipolarQuant, {0,1} spikes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from bestcompress.exporters import export_model
from bestcompress.exporters.graph import GraphRunner
from bestcompress.exporters.onnx import lower_to_standard
from bestcompress.exporters.prepare import binary_layer_paths, neuron_paths
from bestcompress.exporters.qonnx import get_meta, to_qonnx
from bestcompress.exporters.graph_check import verify_graph

from .conftest import FAMILIES


@pytest.mark.parametrize("name", FAMILIES)
def test_qonnx_and_onnx_match_pytorch(name, binary_models):
    model, _ = binary_models(name)
    x = torch.rand((2,) + tuple(model.bc_input_shape), generator=torch.Generator().manual_seed(1))
    proto = to_qonnx(model, x)
    meta = get_meta(proto)

    # every binary layer has its BipolarQuant on a constant weight
    layers = binary_layer_paths(model)
    assert layers and sorted(meta["weights"]) == sorted(layers)
    inits = {i.name for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    for layer, node_name in meta["weights"].items():
        node = nodes[node_name]
        assert node.op_type == "BipolarQuant" and node.input[0] in inits, layer
    # every neuron is mapped to a graph tensor
    assert {p.split("#")[0] for p in meta["spikes"]} == set(neuron_paths(model))

    # the spike tensors hold only 0 and 1 (run the graph, inspect the intermediates)
    ctx = GraphRunner(proto).run({proto.graph.input[0].name: x.numpy()})
    for path, tensor in meta["spikes"].items():
        values = np.unique(ctx[tensor])
        assert set(values.tolist()) <= {0.0, 1.0}, (path, values[:5])
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(ctx[proto.graph.output[0].name] - ref).max() <= 1e-4

    q = verify_graph(proto, model, runtime="qonnx")
    assert q.passed and q.max_abs_diff <= 1e-4 and q.flipped_fraction == 0.0 and q.non_binary == 0, q.message()
    assert len(q.neurons) == len(meta["spikes"]) and all(n.total > 0 for n in q.neurons)

    std = lower_to_standard(proto)
    assert all(n.domain in ("", "ai.onnx") for n in std.graph.node)
    assert not any(n.op_type == "BipolarQuant" for n in std.graph.node)
    o = verify_graph(std, model, runtime="onnxruntime")
    assert o.passed and o.max_abs_diff <= 1e-4 and o.flipped_fraction == 0.0, o.message()


def test_export_writes_verified_files(tmp_path, binary_models):
    model, _ = binary_models("spikformer_seq")
    for fmt in ("qonnx", "onnx"):
        out = tmp_path / f"m_{fmt}.onnx"
        result = export_model(model, fmt, out, batch_size=2)
        assert out.is_file() and result.path == out and result.verification.passed
        assert result.bytes == out.stat().st_size and result.fp32_bytes > 0
        proto = onnx.load(str(out))
        assert get_meta(proto)["format"] == fmt
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_onnx.onnx", "m_qonnx.onnx"]  # no temporary left


def test_flipped_weight_sign_is_caught(tmp_path, binary_models):
    """A graph with one binary weight sign flipped after export fails verification and names a neuron."""
    from bestcompress.exporters import verify_file

    model, _ = binary_models("spikformer_seq")
    out = tmp_path / "m.onnx"
    export_model(model, "qonnx", out, batch_size=2)
    proto = onnx.load(str(out))
    meta = get_meta(proto)
    layer = next(iter(meta["weights"]))  # the first binary layer in graph order (a tokenizer conv)
    node = next(n for n in proto.graph.node if n.name == meta["weights"][layer])
    init = next(i for i in proto.graph.initializer if i.name == node.input[0])
    w = onnx.numpy_helper.to_array(init).copy()
    idx = np.unravel_index(np.argmax(np.abs(w)), w.shape)
    w[idx] = -w[idx]
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(out))
    report = verify_file(out, model, samples=4)
    assert not report.passed
    assert report.max_abs_diff > 1e-4 or report.flipped_fraction > 0
    msg = report.message("the graph")
    assert "first diverges at neuron" in msg or "full-precision path" in msg
    assert msg.count(". ") == 0  # one sentence


def test_real_data_and_bad_data(tmp_path, binary_models):
    from bestcompress.errors import DataError

    model, _ = binary_models("spikformer_seq")
    proto = to_qonnx(model, torch.rand((1,) + tuple(model.bc_input_shape)))
    good = tmp_path / "x.npz"
    np.savez(good, x=np.random.default_rng(0).random((3,) + tuple(model.bc_input_shape)).astype(np.float32))
    report = verify_graph(proto, model, data=good)
    assert report.passed and report.samples == 3 and report.data == "data"
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 5, 5), np.float32))
    with pytest.raises(DataError, match="shape"):
        verify_graph(proto, model, data=bad)
    with pytest.raises(DataError, match="no array 'x'"):
        np.savez(tmp_path / "y.npz", y=np.zeros(3))
        verify_graph(proto, model, data=tmp_path / "y.npz")
