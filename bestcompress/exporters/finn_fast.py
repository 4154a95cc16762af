"""Cheaper drivers for FINN's slowest front-end transforms, with the same result.

qonnx looks tensors up by scanning lists (shapes, datatypes, initializers, producers), so one whole-graph pass
costs O(N²) on an N-node graph, and a transform that changes one node and then re-infers shapes and datatypes
over the whole graph before it looks at the next node costs O(N³). FINN's `InferElementwiseBinaryOperation` does
exactly that (one node per round, then InferShapes + InferDataTypes); on the tiny spikformer_cifar graph it took
10 of the 23 minutes. `ElementwiseInOnePass` makes the same nodes in one walk over the graph in topological order:
every node's output datatype is inferred as soon as the node is visited (converted or not), so each conversion
sees exactly the input datatypes FINN's round after round would have given it, and shapes and datatypes are
re-inferred once at the end.

`streamline_steps` is FINN's `Streamline` (the same transforms in the same order, each to its fixpoint), with
the bookkeeping transforms it runs after every step (RemoveIdentityOps, unique names, readable tensor names,
InferDataTypes, InferDataLayouts) run only after a step that changed the graph, a step skipped when the graph
holds none of the op types it rewrites (the transform would find nothing to do), and RemoveIdentityOps (one node
per round, each round followed by InferShapes; the first step, after which the LIF's ×1 and +0 nodes go, took
108 s on spikformer_seq tiny) as `IdentityOpsInOnePass`.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

HW_DOMAIN = "finn.custom_op.fpgadataflow"


def _narrow_const_dtype(model, name: str, dt):
    """A FLOAT32 constant whose values are integers gets the smallest integer datatype holding them."""
    from qonnx.core.datatype import DataType
    init = model.get_initializer(name)
    if init is None or dt != DataType["FLOAT32"] or not np.all(init == np.round(init)):
        return dt
    lo, hi = float(init.min()), float(init.max())
    mag = hi if lo >= 0 else lo if abs(lo) > hi else -hi - 1
    new = DataType.get_smallest_possible(mag)
    model.set_tensor_datatype(name, new)
    return new


class ElementwiseInOnePass:
    """FINN's elementwise binary hardware layers (ElementwiseAdd/Sub/Mul/..., Sub→Abs as AbsDiff), one pass."""

    def __init__(self) -> None:
        self.converted = 0

    def apply(self, model):
        import finn.custom_op.fpgadataflow.elementwise_binary as elementwise
        from qonnx.transformation.general import SortGraph
        from qonnx.transformation.infer_datatypes import InferDataTypes, _infer_node_datatype
        from qonnx.transformation.infer_shapes import InferShapes

        model = model.transform(SortGraph())
        known = set(dir(elementwise))
        graph = model.graph
        nodes = list(graph.node)
        out, skip = [], set()
        for node in nodes:
            if id(node) in skip:
                continue
            if f"Elementwise{node.op_type}" not in known or len(node.input) != 2:
                out.append(node)
                _infer_node_datatype(model, node, False)
                continue
            new, fused = self._convert(model, node)
            if fused is not None:
                skip.add(id(fused))
            out.append(new)
            _infer_node_datatype(model, new, False)
            self.converted += 1
        del graph.node[:]
        graph.node.extend(out)
        return model.transform(InferShapes()).transform(InferDataTypes())

    @staticmethod
    def _convert(model, node):
        from qonnx.core.datatype import DataType
        from finn.transformation.fpgadataflow.convert_to_hw.elementwise_binary_operation import lift_to_rank1

        in0, in1 = node.input[0], node.input[1]
        const0, const1 = model.get_initializer(in0) is not None, model.get_initializer(in1) is not None
        if const0 and const1:
            raise ValueError(f"{node.name}: both inputs are constant (fold constants first)")
        lift_to_rank1(in0, model)
        lift_to_rank1(in1, model)
        result = node.output[0]
        dt0 = model.get_tensor_datatype(in0)
        dt1 = model.get_tensor_datatype(in1)
        odt = model.get_tensor_datatype(result)
        if const0:
            dt0 = _narrow_const_dtype(model, in0, dt0)
        if const1:
            dt1 = _narrow_const_dtype(model, in1, dt1)
        if dt0.is_integer() and dt1.is_integer():
            odt = DataType["INT32"]
            model.set_tensor_datatype(result, odt)
        op, fused = node.op_type, None
        if op == "Sub":
            consumers = model.find_consumers(result) or []
            if len(consumers) == 1 and consumers[0].op_type == "Abs":
                op, fused = "AbsDiff", consumers[0]
                result = fused.output[0]
                if dt0.is_integer() and dt1.is_integer():
                    odt = DataType["UINT32"]
                    model.set_tensor_datatype(result, odt)
        new = helper.make_node(
            f"Elementwise{op}", [in0, in1], [result], domain=HW_DOMAIN, backend="fpgadataflow",
            lhs_shape=model.get_tensor_shape(in0), rhs_shape=model.get_tensor_shape(in1),
            out_shape=model.get_tensor_shape(result), lhs_dtype=str(dt0), rhs_dtype=str(dt1), out_dtype=str(odt),
            lhs_style="const" if const0 else "input", rhs_style="const" if const1 else "input")
        new.name = node.name
        return new, fused


# op types a Streamline step rewrites: when the graph holds none of a set, the step has nothing to match
_NEEDS = {
    "ConvertSubToAdd": {"Sub"}, "ConvertDivToMul": {"Div"}, "BatchNormToAffine": {"BatchNormalization"},
    "ConvertSignToThres": {"Sign"}, "MoveMulPastMaxPool": {"MaxPool", "Mul"},
    "AbsorbScalarBiasIntoMultiThreshold": {"Add", "MultiThreshold"}, "MoveScalesPastIm2Col": {"Im2Col"},
    "MoveAddPastMul": {"Add", "Mul"}, "MoveScalarAddPastMatMul": {"Add", "MatMul"},
    "MoveAddPastConv": {"Add", "Conv"}, "MoveScalarMulPastMatMul": {"Mul", "MatMul"},
    "MoveScalarMulPastConv": {"Mul", "Conv"}, "CollapseRepeatedAdd": {"Add"}, "CollapseRepeatedMul": {"Mul"},
    "AbsorbAddIntoMultiThreshold": {"Add", "MultiThreshold"}, "FactorOutMulSignMagnitude": {"Mul"},
    "AbsorbMulIntoMultiThreshold": {"Mul", "MultiThreshold"}, "Absorb1BitMulIntoMatMul": {"Mul", "MatMul"},
    "Absorb1BitMulIntoConv": {"Mul", "Conv"},
}


def _is_identity(model, node, atol: float) -> bool:
    """qonnx RemoveIdentityOps' test: Add/Sub of ~0, Mul/Div by ~1, a zero Pad, Identity, a no-op Dropout."""
    op = node.op_type
    if op in ("Add", "Sub", "Mul", "Div"):
        a = model.get_initializer(node.input[1])
        target = 0.0 if op in ("Add", "Sub") else 1.0
        return a is not None and bool(np.isclose(a, np.full_like(a, target), atol=atol).all())
    if op == "Pad":
        from qonnx.util.basic import get_by_name
        pads = get_by_name(node.attribute, "pads")
        pads = np.asarray(pads.ints, dtype=np.int64) if pads is not None else model.get_initializer(node.input[1])
        return pads is not None and bool((pads == 0).all())
    if op == "Identity":
        return True
    if op == "Dropout":
        if model.model.opset_import[0].version < 12:
            from qonnx.util.basic import get_by_name
            ratio = get_by_name(node.attribute, "ratio")
            return ratio is not None and ratio.f == 0
        return len(node.input) == 1 or bool(model.get_initializer(node.input[1]) == 0)
    return False


class IdentityOpsInOnePass:
    """qonnx's RemoveIdentityOps (same test, same rewiring) in one walk; qonnx removes one node per round and
    re-infers every shape in between."""

    def __init__(self, atol: float = 1e-05) -> None:
        self.atol = atol
        self.removed = 0

    def apply(self, model):
        import copy

        from qonnx.transformation.infer_shapes import InferShapes
        from qonnx.transformation.remove import remove_node_and_rewire

        model = copy.deepcopy(model)  # the caller's graph stays as it was (a qonnx transform works on a copy too)
        for node in list(model.graph.node):
            if _is_identity(model, node, self.atol) and not model.is_join_node(node):
                remove_node_and_rewire(model, node)
                self.removed += 1
        return model.transform(InferShapes())


class _Bookkeeping:
    """Streamline's after-step transforms; idempotent, so they run only when a step changed the graph."""

    def __init__(self) -> None:
        self.dirty = True

    def run(self, model):
        from qonnx.transformation.general import GiveReadableTensorNames, GiveUniqueNodeNames
        from qonnx.transformation.infer_data_layouts import InferDataLayouts
        from qonnx.transformation.infer_datatypes import InferDataTypes
        if self.dirty:
            model = IdentityOpsInOnePass().apply(model)
            for t in (GiveUniqueNodeNames(), GiveReadableTensorNames(), InferDataTypes(),
                      InferDataLayouts()):
                model = model.transform(t)
            self.dirty = False
        return model


class StreamlineStep:
    """One step of FINN's Streamline: the transform to its fixpoint, then the bookkeeping if it changed anything."""

    def __init__(self, transform, book: _Bookkeeping, index: int) -> None:
        self.transform = transform
        self.book = book
        self.label = f"Streamline[{index}] {type(transform).__name__}"

    def apply(self, model):
        needs = _NEEDS.get(type(self.transform).__name__)
        if needs is not None and not needs <= {n.op_type for n in model.graph.node}:
            return self.book.run(model)  # nothing to rewrite; keep any pending bookkeeping
        before = model.model.SerializeToString(deterministic=True)
        model = model.transform(self.transform)
        if model.model.SerializeToString(deterministic=True) != before:
            self.book.dirty = True
        return self.book.run(model)


# FINN+ 1.6.1's Streamline.apply, in its order (tests/exporters/test_finn_fast.py checks it against FINN's source)
STREAMLINE = ("ConvertSubToAdd", "ConvertDivToMul", "BatchNormToAffine", "ConvertSignToThres", "MoveMulPastMaxPool",
              "AbsorbScalarBiasIntoMultiThreshold", "MoveScalesPastIm2Col", "MoveScalarLinearPastInvariants",
              "MoveAddPastMul", "MoveScalarAddPastMatMul", "MoveAddPastConv", "MoveScalarMulPastMatMul",
              "MoveScalarMulPastConv", "MoveAddPastMul", "CollapseRepeatedAdd", "CollapseRepeatedMul",
              "MoveMulPastMaxPool", "AbsorbAddIntoMultiThreshold", "FactorOutMulSignMagnitude",
              "AbsorbMulIntoMultiThreshold", "Absorb1BitMulIntoMatMul", "Absorb1BitMulIntoConv")


def streamline_steps() -> list:
    """FINN's Streamline as separate steps (the same transforms in the same order) for the pipeline driver."""
    from finn.transformation import streamline as S

    book = _Bookkeeping()
    return [StreamlineStep(getattr(S, n)(), book, i) for i, n in enumerate(STREAMLINE)]
