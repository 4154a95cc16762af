"""Our passes on the FINN-ready graph: 1-bit convolutions with a folded BatchNorm get ±1 weights back, and the
cheaper drivers of FINN's Streamline, identity removal and elementwise conversion give FINN's own graph (the
same nodes and outputs; independent nodes may come in another order)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

HAVE_QONNX = importlib.util.find_spec("qonnx") is not None
HAVE_FINN = importlib.util.find_spec("finn") is not None
needs_finn = pytest.mark.skipif(not HAVE_FINN, reason="FINN+ (the [finn] extra) is not installed")


def _conv_graph(w: np.ndarray, bias: np.ndarray | None):
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    inputs = ["x", "w"] + (["b"] if bias is not None else [])
    node = helper.make_node("Conv", inputs, ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[0], 5, 5])])
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    model.set_initializer("w", w)
    if bias is not None:
        model.set_initializer("b", bias)
    return model.transform(InferShapes())


@pytest.mark.skipif(not HAVE_QONNX, reason="qonnx is not installed")
def test_conv_with_folded_scale_is_split_into_signs_scale_and_bias():
    from qonnx.core.onnx_exec import execute_onnx

    from bestcompress.exporters.finn_graph import FactorConvWeights
    from bestcompress.exporters.finn_ready import bipolar_initializers

    rng = np.random.default_rng(0)
    m = rng.uniform(0.1, 2.0, (6, 1, 1, 1)).astype(np.float32)  # BN scale × α per output channel
    w = (np.where(rng.random((6, 4, 3, 3)) < 0.5, -1.0, 1.0) * m).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    x = (rng.random((1, 4, 5, 5)) < 0.5).astype(np.float32)  # spikes
    model = _conv_graph(w, bias)
    ref = execute_onnx(model, {"x": x})["y"]
    assert bipolar_initializers(model.model) == []
    p = FactorConvWeights()
    model = p.apply(model)
    assert p.factored == ["conv"]
    assert [n.op_type for n in model.graph.node] == ["Conv", "Mul", "Add"]
    conv = model.graph.node[0]
    assert len(conv.input) == 2 and bipolar_initializers(model.model) == [conv.input[1]]
    np.testing.assert_allclose(execute_onnx(model, {"x": x})["y"], ref, rtol=1e-5, atol=1e-5)
    # a full-precision convolution (weights not ±m per channel) is left alone
    fp = _conv_graph(rng.normal(size=(6, 4, 3, 3)).astype(np.float32), bias)
    q = FactorConvWeights()
    assert [n.op_type for n in q.apply(fp).graph.node] == ["Conv"] and q.factored == []


def _same_graph(a, b) -> None:
    """The same nodes (op type, attributes, constant operands, output datatype) up to the order of independent
    nodes and the names that order gives, and the same outputs on random inputs."""
    from collections import Counter

    from qonnx.core.onnx_exec import execute_onnx

    def signature(m):
        out = Counter()
        for n in m.graph.node:
            consts = tuple(m.get_initializer(i).tobytes() for i in n.input if m.get_initializer(i) is not None)
            attrs = tuple(sorted((x.name, x.SerializeToString()) for x in n.attribute))
            out[(n.op_type, attrs, consts, m.get_tensor_datatype(n.output[0]).name)] += 1
        return out
    assert signature(a) == signature(b)
    rng = np.random.default_rng(0)
    name = a.graph.input[0].name
    for _ in range(2):
        x = rng.random(a.get_tensor_shape(name)).astype(np.float32)
        np.testing.assert_array_equal(execute_onnx(a, {name: x})[a.graph.output[0].name],
                                      execute_onnx(b, {name: x})[b.graph.output[0].name])


def _ready(model, shape):
    from bestcompress.exporters.finn_ready import finn_ready_graph
    torch.manual_seed(3)
    graph, _, _ = finn_ready_graph(model, torch.rand((1,) + tuple(shape)))
    return graph


@needs_finn
def test_streamline_steps_are_finns_streamline(tiny_conv_binary):
    import inspect
    import re

    from finn.transformation.streamline import Streamline

    from bestcompress.exporters.finn import _run_stage
    from bestcompress.exporters.finn_fast import STREAMLINE, streamline_steps
    from bestcompress.exporters.finn_ready import Quiet

    assert tuple(re.findall(r"(\w+)\(\),", inspect.getsource(Streamline.apply).split("for trn")[0])) == STREAMLINE
    ready = _ready(tiny_conv_binary, tiny_conv_binary.bc_input_shape)
    with Quiet():
        theirs = ready.transform(Streamline())
        lines: list[str] = []
        ours = _run_stage(ready, streamline_steps(), [], "streamline", lines.append)
    assert len(lines) == len(STREAMLINE) and all(" s (" in line for line in lines)  # one line per step
    _same_graph(ours, theirs)
    assert len(theirs.graph.node) < len(ready.graph.node)  # it did streamline something


@needs_finn
def test_elementwise_in_one_pass_makes_finns_nodes(tiny_conv_binary):
    from finn.transformation.fpgadataflow.convert_to_hw.elementwise_binary_operation import (
        InferElementwiseBinaryOperation,
    )
    from finn.transformation.streamline import Streamline
    from qonnx.transformation.general import GiveUniqueNodeNames

    from bestcompress.exporters.finn_fast import ElementwiseInOnePass
    from bestcompress.exporters.finn_ready import Quiet

    with Quiet():
        streamlined = _ready(tiny_conv_binary, tiny_conv_binary.bc_input_shape).transform(Streamline())
        theirs = streamlined.transform(InferElementwiseBinaryOperation()).transform(GiveUniqueNodeNames())
        p = ElementwiseInOnePass()
        ours = p.apply(streamlined.transform(GiveUniqueNodeNames())).transform(GiveUniqueNodeNames())
    assert p.converted > 5 and any(n.op_type.startswith("Elementwise") for n in theirs.graph.node)
    _same_graph(ours, theirs)


@needs_finn
def test_identity_ops_in_one_pass_equal_qonnxs():
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.transformation.remove import RemoveIdentityOps

    from bestcompress.exporters.finn_fast import IdentityOpsInOnePass
    from bestcompress.exporters.finn_ready import Quiet

    # x -> Mul(1) -> Add(0) -> Relu -> Sub(0.5) -> Div(1) -> Identity -> Mul(1.00001, within atol) -> Add(0.3) -> y,
    # the Relu's output also read by a second branch (a fork) that adds it back at the end
    chain = [("Mul", 1.0), ("Add", 0.0), ("Relu", None), ("Sub", 0.5), ("Div", 1.0), ("Identity", None),
             ("Mul", 1.000001), ("Add", 0.3)]
    nodes, consts, prev = [], {}, "x"
    for i, (op, c) in enumerate(chain):
        ins = [prev] + ([f"c{i}"] if c is not None else [])
        if c is not None:
            consts[f"c{i}"] = np.full((1, 6), c, dtype=np.float32)
        nodes.append(helper.make_node(op, ins, [f"t{i}"], name=f"n{i}"))
        prev = f"t{i}"
    nodes.append(helper.make_node("Add", [prev, "t2"], ["y"], name="join"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])])
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    for k, v in consts.items():
        model.set_initializer(k, v)
    model = model.transform(InferShapes())
    with Quiet():
        theirs = model.transform(RemoveIdentityOps())
        p = IdentityOpsInOnePass()
        ours = p.apply(model.transform(InferShapes()))
    assert p.removed == 5 and [n.op_type for n in ours.graph.node] == ["Relu", "Sub", "Add", "Add"]
    _same_graph(ours, theirs)
