"""Indexed qonnx lookups and one-pass renaming/sorting (finn_index.py, finn_names.py) give FINN's own graphs:
the whole front-end byte for byte on a real FINN-ready graph, every lookup equal to qonnx's after direct edits
of the graph, and the renaming and sorting transforms equal to qonnx's."""
from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest

HAVE_FINN = importlib.util.find_spec("finn") is not None
pytestmark = pytest.mark.skipif(not HAVE_FINN, reason="FINN+ (the [finn] extra) is not installed")


def _ready(model):
    import torch

    from bestcompress.exporters.finn_ready import finn_ready_graph
    torch.manual_seed(3)
    graph, _, _ = finn_ready_graph(model, torch.rand((1,) + tuple(model.bc_input_shape)))
    return graph


def _bytes(m) -> bytes:
    return m.model.SerializeToString(deterministic=True)


def _pipeline(ready, fast: bool):
    import qonnx.util.basic as util

    from bestcompress.exporters import finn, finn_index
    random.seed(0)  # qonnx draws random tensor names
    original = util.get_by_name
    if fast:
        return finn.finn_pipeline(ready)[0]
    with pytest.MonkeyPatch.context() as mp:  # the pipeline without the indexed lookups: qonnx's own
        mp.setattr(finn_index, "indexed_lookups", _no_index)
        stages = finn.finn_pipeline(ready)[0]
    assert util.get_by_name is original
    return stages


class _no_index:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_front_end_gives_the_same_graphs_byte_for_byte(tiny_conv_binary):
    import qonnx.util.basic as util
    from qonnx.core.modelwrapper import ModelWrapper

    ready = _ready(tiny_conv_binary)
    lookups = (util.get_by_name, ModelWrapper.get_initializer, ModelWrapper.find_producer)
    _pipeline(ready, fast=True)  # imports on first use draw random numbers too: both runs below start warm
    theirs = _pipeline(ready, fast=False)
    ours = _pipeline(ready, fast=True)
    assert (util.get_by_name, ModelWrapper.get_initializer, ModelWrapper.find_producer) == lookups  # restored
    for stage in ("finn", "streamlined", "hw"):
        assert _bytes(ours[stage]) == _bytes(theirs[stage]), stage
    assert any(n.op_type == "MVAU" for n in ours["hw"].graph.node)  # the pipeline did its work


def _wide_graph(n: int = 40):
    """A chain of n Mul-by-constant nodes (each constant an initializer), shapes and datatypes inferred."""
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    nodes = [helper.make_node("Mul", [f"t{i}", f"c{i}"], [f"t{i + 1}"], name=f"mul{i}") for i in range(n)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1, 4])])
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    for i in range(n):
        model.set_initializer(f"c{i}", np.full((1, 4), i + 2, np.float32))
    model = model.transform(InferShapes()).transform(InferDataTypes())
    model.set_tensor_datatype("t0", DataType["BINARY"])
    return model


def _answers(model, names):
    return [(str(model.get_tensor_datatype(t)), model.get_tensor_shape(t),
             None if (v := model.get_initializer(t)) is None else v.tolist(),
             None if (p := model.find_producer(t)) is None else p.name,
             None if (vi := model.get_tensor_valueinfo(t)) is None else vi.name) for t in names]


def test_lookups_follow_direct_edits_of_the_graph():
    from onnx import helper

    from qonnx.core.datatype import DataType

    from bestcompress.exporters.finn_index import indexed_lookups, renamed

    names = [f"t{i}" for i in range(41)] + [f"c{i}" for i in range(40)] + ["new", "gone", "absent", "absent2", "t0b"]

    def edits(model):
        g = model.graph
        yield lambda: None
        yield lambda: model.rename_tensor("t5", "new")  # in place, every container
        yield lambda: g.initializer.remove(g.initializer[3])  # positions shift
        yield lambda: g.node.insert(0, helper.make_node("Relu", ["t0"], ["gone"], name="relu"))
        yield lambda: g.node.remove(g.node[0])
        yield lambda: (setattr(g.value_info[7], "name", "gone"), renamed())  # a direct in-place rename, said
        yield lambda: g.quantization_annotation.remove(g.quantization_annotation[2])
        yield lambda: model.set_initializer("c7", np.zeros((1, 4), np.float32))  # replaced, moved to the end
        yield lambda: model.set_tensor_datatype("new", DataType["INT4"])  # appended after a miss on "new"
        yield lambda: (model.set_tensor_shape("t9", [2, 2]), model.set_tensor_shape("absent", [3]))  # moved, added
        yield lambda: (g.value_info.remove(g.value_info[0]), model.set_tensor_shape("t0b", [1]))  # same length
        yield lambda: model.rename_tensor("t12", "absent2")  # in place, in the middle of every container

    def run(order):
        model, answers = _wide_graph(), []
        for edit in edits(model):
            edit()
            answers.append(_answers(model, order))  # each name's misses are stamped before the next edit
        return answers

    for order in (names, names[::-1]):  # a renamed element's new name asked before (or after) its old one
        with indexed_lookups() as maps:
            ours = run(order)
            assert maps.hits > 0 and maps.proven_absent > 0
        assert ours == run(order)


def test_duplicate_names_raise_as_in_qonnx():
    from onnx import helper

    from bestcompress.exporters.finn_index import indexed_lookups

    model = _wide_graph()
    model.graph.value_info.append(helper.make_tensor_value_info("t3", 1, [1, 4]))
    with pytest.raises(AssertionError):
        model.get_tensor_valueinfo("t3")
    with indexed_lookups(), pytest.raises(Exception, match="multiple"):
        model.get_tensor_valueinfo("t3")


def test_readable_names_and_sort_equal_qonnxs():
    import qonnx.transformation.general as general
    from onnx import helper
    from qonnx.transformation.general import GiveReadableTensorNames, SortGraph

    from bestcompress.exporters.finn_index import indexed_lookups

    def graph():
        m = _wide_graph(12)
        g = m.graph
        # one tensor twice in a node's inputs (qonnx renames only the first), one initializer shared by two nodes
        g.node.append(helper.make_node("Mul", ["t12", "t12"], ["sq"], name="sq"))
        g.node.append(helper.make_node("Add", ["sq", "c0"], ["out2"], name="add"))
        g.output.append(helper.make_tensor_value_info("out2", 1, [1, 4]))
        nodes = list(g.node)
        rng = random.Random(1)
        rng.shuffle(nodes)  # SortGraph has work to do
        copies = [type(nodes[0])() for _ in nodes]
        for c, n in zip(copies, nodes):
            c.CopyFrom(n)
        del g.node[:]
        g.node.extend(copies)
        return m

    a, b = graph(), graph()
    random.seed(0)
    theirs = a.transform(SortGraph()).transform(GiveReadableTensorNames())
    random.seed(0)
    with indexed_lookups():
        assert general.SortGraph is not SortGraph and general.GiveReadableTensorNames is not GiveReadableTensorNames
        ours = b.transform(general.SortGraph()).transform(general.GiveReadableTensorNames())
    assert general.SortGraph is SortGraph  # restored
    assert _bytes(ours) == _bytes(theirs)
    assert [n.name for n in ours.graph.node][:3] == ["mul0", "mul1", "mul2"]  # sorted again
    sq = [n for n in ours.graph.node if n.name == "sq"][0]
    assert sq.input[0] != sq.input[1]  # qonnx's rename_tensor renames the first occurrence only: kept
