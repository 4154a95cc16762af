"""Standard ONNX: the QONNX graph with every QONNX-only op lowered to standard ops, so onnxruntime runs it.

BipolarQuant(x, s) = s·(+1 if x >= 0 else −1):
- on a constant (a binary weight) it is folded into a ±s initializer (the binary weight itself);
- on an activation (a spike threshold) it becomes Where(GreaterOrEqual(x, 0), +1, −1), times s unless s is 1.
Both are exact, so the lowered graph computes bit for bit what the QONNX graph computes.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pathlib import Path

from torch import nn

from ..errors import ExportError, short_reason
from . import graph as G
from .formats import ExportFormat, ExportOptions, ExportResult, path_bytes, register_format, write_verified
from .graph import get_meta, set_meta
from .graph_check import is_qonnx, read_graph, verify_file_graph, verify_graph
from .qonnx import _starts_with, qonnx_graph


def _bipolar(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (np.where(x >= 0, 1.0, -1.0).astype(np.float32) * scale).astype(np.float32)


def lower_to_standard(qonnx_proto: onnx.ModelProto) -> onnx.ModelProto:
    """A standard-ONNX copy of a QONNX graph (the input is left unchanged).

    Raises:
        ExportError: when the graph holds a custom op that has no standard lowering.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(qonnx_proto)
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    meta = get_meta(proto)
    weight_nodes = {node: layer for layer, node in (meta.get("weights") or {}).items()}
    weights: dict[str, str] = {}
    new_nodes, new_inits = [], []
    for node in g.node:
        if node.domain in G.STANDARD_DOMAINS:
            new_nodes.append(node)
            continue
        if node.op_type != "BipolarQuant":
            raise ExportError(f"The graph holds the {node.domain} op '{node.op_type}' (node '{node.name}'), which "
                              "has no lowering to standard ONNX.")
        x_name, s_name = node.input[0], node.input[1]
        if s_name not in inits:
            raise ExportError(f"BipolarQuant node '{node.name}' has a computed scale; only constant scales lower "
                              "to standard ONNX.")
        scale = numpy_helper.to_array(inits[s_name]).astype(np.float32)
        out = node.output[0]
        if x_name in inits:  # a binary weight: fold it
            new_inits.append(numpy_helper.from_array(_bipolar(numpy_helper.to_array(inits[x_name]), scale), out))
            if node.name in weight_nodes:
                weights[weight_nodes[node.name]] = out
            continue
        zero, pos, neg = f"{node.name}_zero", f"{node.name}_pos", f"{node.name}_neg"
        new_inits += [numpy_helper.from_array(np.zeros((), np.float32), zero),
                      numpy_helper.from_array(np.ones((), np.float32), pos),
                      numpy_helper.from_array(-np.ones((), np.float32), neg)]
        cond = f"{node.name}_ge"
        new_nodes.append(helper.make_node("GreaterOrEqual", [x_name, zero], [cond], name=f"{node.name}_GreaterOrEqual"))
        if scale.size == 1 and float(scale.reshape(-1)[0]) == 1.0:
            new_nodes.append(helper.make_node("Where", [cond, pos, neg], [out], name=f"{node.name}_Where"))
        else:
            sign = f"{node.name}_sign"
            new_nodes.append(helper.make_node("Where", [cond, pos, neg], [sign], name=f"{node.name}_Where"))
            new_nodes.append(helper.make_node("Mul", [sign, s_name], [out], name=f"{node.name}_Mul"))
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    kept_vi = [vi for vi in g.value_info if vi.name not in {i.name for i in new_inits}]
    del g.value_info[:]
    g.value_info.extend(kept_vi)
    del g.quantization_annotation[:]
    for imp in list(proto.opset_import):
        if imp.domain not in G.STANDARD_DOMAINS:
            proto.opset_import.remove(imp)
    G.remove_unused(proto)
    proto = G.infer_shapes(proto)
    if meta:
        meta.update(format="onnx", weights=weights)
        set_meta(proto, meta)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"The lowered graph is not valid ONNX ({short_reason(e, 200)}).") from None
    return proto


# ------------------------------------------------------------------------------------------------ the format

def _export(model: nn.Module, path: Path, opts: ExportOptions) -> ExportResult:
    qonnx = qonnx_graph(model, opts)  # shared with a qonnx export of the same run: traced once
    opts.progress("lowering the QONNX ops to standard ONNX")
    proto = lower_to_standard(qonnx)
    report = write_verified(
        path, lambda tmp: onnx.save(proto, str(tmp)),
        lambda tmp: verify_graph(read_graph(tmp), model, "onnxruntime", opts.data, opts.samples, opts.tolerance,
                                 opts.seed, progress=opts.progress) if opts.verify else None, "The ONNX export")
    return ExportResult(path, "onnx", path_bytes(path), 0, report)


def _verify(path: Path, model: nn.Module, opts: ExportOptions):
    return verify_file_graph(path, model, "onnxruntime", opts)


def _recognise(path: Path) -> bool:
    if not path.is_file() or _starts_with(path, b"PK"):
        return False
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return bool(proto.graph.node) and not is_qonnx(proto)


register_format(ExportFormat(
    "onnx", "standard ONNX (QONNX ops lowered to standard ops) for onnxruntime", ".onnx", _export, _verify,
    _recognise))
