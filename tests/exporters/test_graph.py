"""The linear-time ONNX tools (exporters/graph.py) and the neuron-by-neuron cut (graph_check.cut_at_spikes), on
small hand-built graphs whose result is known, checked against onnxruntime and qonnx's own executor."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bestcompress.errors import ExportError
from bestcompress.exporters import graph as G
from bestcompress.exporters.graph_check import REF_SUFFIX, check_domains, cut_at_spikes

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=(), value_info=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits), value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(G.QONNX_DOMAIN, 1)])
    m.ir_version = 8
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _ort(proto, feeds):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _affine() -> onnx.ModelProto:
    """y = ((x + 0) * 1) @ W + (b1 + b2) with a constant subgraph (b1 + b2) to fold."""
    w = numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "W")
    b1 = numpy_helper.from_array(np.ones(3, np.float32), "b1")
    b2 = numpy_helper.from_array(np.full(3, 2.0, np.float32), "b2")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    one = numpy_helper.from_array(np.ones((), np.float32), "one")
    nodes = [helper.make_node("Add", ["x", "zero"], ["x0"]), helper.make_node("Mul", ["x0", "one"], ["x1"]),
             helper.make_node("MatMul", ["x1", "W"], ["h"]), helper.make_node("Add", ["b1", "b2"], ["b"]),
             helper.make_node("Add", ["h", "b"], ["y"])]
    return G.infer_shapes(_model(nodes, [_vi("x", [2, 4])], [_vi("y", [2, 3])], [w, b1, b2, zero, one]))


def test_fold_constants_and_identity_arithmetic_keep_the_values():
    proto = _affine()
    x = RNG.random((2, 4), dtype=np.float32)
    want = _ort(proto, {"x": x})[0]
    folded = G.fold_constants(proto)
    assert [n.op_type for n in folded.graph.node] == ["Add", "Mul", "MatMul", "Add"]  # b1 + b2 is a constant now
    aliases: dict = {}
    slim = G.remove_identity_arithmetic(folded, aliases)
    assert [n.op_type for n in slim.graph.node] == ["MatMul", "Add"]
    assert aliases == {"x0": "x", "x1": "x"}
    assert {i.name for i in slim.graph.initializer} == {"W", "b"}  # the unused ones are gone
    np.testing.assert_array_equal(_ort(slim, {"x": x})[0], want)


def test_identity_arithmetic_keeps_a_broadcasting_constant():
    """x + zeros([2, 4]) with x [4] broadcasts x: removing it would change the output shape."""
    zeros = numpy_helper.from_array(np.zeros((2, 4), np.float32), "z")
    proto = G.infer_shapes(_model([helper.make_node("Add", ["x", "z"], ["s"]), helper.make_node("Relu", ["s"], ["y"])],
                                  [_vi("x", [4])], [_vi("y", [2, 4])], [zeros]))
    assert [n.op_type for n in G.remove_identity_arithmetic(proto).graph.node] == ["Add", "Relu"]


def _bipolar_linear(transposed: bool = True) -> onnx.ModelProto:
    """y = x @ BipolarQuant(Wᵀ, 1)ᵀ, as the TorchScript exporter writes a Linear layer."""
    w = numpy_helper.from_array(RNG.standard_normal((3, 4)).astype(np.float32), "W")
    s = numpy_helper.from_array(np.ones((), np.float32), "s")
    nodes = [helper.make_node("BipolarQuant", ["W", "s"], ["wq"], domain=G.QONNX_DOMAIN),
             helper.make_node("Transpose", ["wq"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    return G.infer_shapes(_model(nodes, [_vi("x", [2, 4])], [_vi("y", [2, 3])], [w, s]))


def test_shapes_through_bipolar_quant_and_transpose_folded_into_the_weight():
    proto = _bipolar_linear()
    shapes = G.static_shapes(proto)
    assert shapes["wq"] == (3, 4) and shapes["wt"] == (4, 3) and shapes["y"] == (2, 3)
    bq = next(n for n in proto.graph.node if n.op_type == "BipolarQuant")
    assert bq.domain == G.QONNX_DOMAIN and list(bq.input) == ["W", "s"]  # restored after inference
    x = RNG.random((2, 4), dtype=np.float32)
    want = G.GraphRunner(proto).run({"x": x})["y"]
    w = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "W"))
    np.testing.assert_allclose(want, x @ np.where(w >= 0, 1.0, -1.0).T.astype(np.float32), rtol=1e-6)
    folded = G.fold_transpose_into_quant_init(proto)  # (in place)
    assert [n.op_type for n in folded.graph.node] == ["BipolarQuant", "MatMul"]
    assert tuple(next(i for i in folded.graph.initializer if i.name == "W").dims) == (4, 3)
    np.testing.assert_array_equal(G.GraphRunner(folded).run({"x": x})["y"], want)


def test_graph_runner_equals_qonnx_executor_and_holds_only_what_is_asked():
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    proto = _bipolar_linear()
    x = RNG.random((2, 4), dtype=np.float32)
    runner = G.GraphRunner(proto)
    everything = runner.run({"x": x})
    assert {"x", "wq", "wt", "y"} <= set(everything)
    ref = execute_onnx(ModelWrapper(proto), {"x": x})
    np.testing.assert_array_equal(everything["y"], ref["y"])
    kept = runner.run({"x": x}, keep={"wt"})
    assert set(kept) == {"wt", "y"}  # intermediates are dropped after their last reader
    np.testing.assert_array_equal(kept["y"], everything["y"])
    np.testing.assert_array_equal(runner.run({"x": x})["y"], everything["y"])  # sessions are reused


def test_names_and_metadata():
    proto = _bipolar_linear()
    G.unique_node_names(proto)
    assert [n.name for n in proto.graph.node] == ["BipolarQuant_0", "Transpose_0", "MatMul_0"]
    G.readable_tensor_names(proto)
    names = [list(n.input) + list(n.output) for n in proto.graph.node]
    assert names[0] == ["BipolarQuant_0_param0", "BipolarQuant_0_param1", "BipolarQuant_0_out0"]
    assert names[2] == ["global_in", "Transpose_0_out0", "global_out"]
    assert proto.graph.input[0].name == "global_in" and proto.graph.output[0].name == "global_out"
    assert G.get_meta(proto) == {}
    G.set_meta(proto, {"spikes": {"lif": "t"}})
    G.set_meta(proto, {"spikes": {"lif": "u"}})  # replaced, not appended
    assert G.get_meta(proto) == {"spikes": {"lif": "u"}} and len(proto.metadata_props) == 1
    with pytest.raises(ValueError, match="no known shape"):
        G.with_outputs(proto, ["nowhere"])


def _spiking() -> onnx.ModelProto:
    """s = (x @ W >= 1) as {0,1} (a one-step neuron), y = s @ V: the spike tensor 's' feeds the next layer."""
    w = numpy_helper.from_array(RNG.standard_normal((4, 5)).astype(np.float32), "W")
    v = numpy_helper.from_array(RNG.standard_normal((5, 3)).astype(np.float32), "V")
    one = numpy_helper.from_array(np.ones((), np.float32), "one")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("GreaterOrEqual", ["h", "one"], ["c"]),
             helper.make_node("Cast", ["c"], ["s"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["s", "V"], ["y"])]
    return G.infer_shapes(_model(nodes, [_vi("x", [2, 4])], [_vi("y", [2, 3])], [w, v, one]))


def test_cut_at_spikes_feeds_the_reference_spikes_to_the_readers():
    proto = _spiking()
    cut, fed = cut_at_spikes(proto, {"lif": "s"})
    assert fed == {"lif": "s" + REF_SUFFIX}
    assert [i.name for i in cut.graph.input] == ["x", "s" + REF_SUFFIX]
    assert [o.name for o in cut.graph.output] == ["y", "s"]
    assert [list(n.input) for n in cut.graph.node][-1] == ["s" + REF_SUFFIX, "V"]
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    own_y, own_s = _ort(proto, {"x": x})[0], G.GraphRunner(proto).run({"x": x})["s"]
    y, s = _ort(cut, {"x": x, "s" + REF_SUFFIX: own_s})
    np.testing.assert_array_equal(s, own_s)
    np.testing.assert_array_equal(y, own_y)  # fed its own spikes, the cut graph is the graph
    other = 1.0 - own_s
    y2, s2 = _ort(cut, {"x": x, "s" + REF_SUFFIX: other})
    np.testing.assert_array_equal(s2, own_s)  # the neuron still computes from x ...
    np.testing.assert_allclose(y2, other @ numpy_helper.to_array(cut.graph.initializer[1]), rtol=1e-6)  # ... y from the feed
    assert [i.name for i in proto.graph.input] == ["x"]  # the original is untouched


def test_check_domains_walks_subgraphs():
    inner = helper.make_graph([helper.make_node("Evil", ["a"], ["b"], domain="mypkg.ops")], "body", [_vi("a", [1])],
                              [_vi("b", [1])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner)
    proto = _model([node], [], [_vi("y", [1])], [cond])
    with pytest.raises(ExportError, match="custom-op domain 'mypkg.ops'"):
        check_domains(proto, "The graph")
    check_domains(_bipolar_linear(), "The graph")
