"""Linear-time ONNX graph clean-up and a node-by-node executor for unrolled spiking graphs.

qonnx's own transformations (FoldConstants, GiveReadableTensorNames, InferDataTypes, ...) look tensors up by
scanning lists and FoldConstants folds one node per pass, so they are quadratic or worse in the graph size: an
unrolled Spikformer has thousands of nodes and takes minutes. The functions here do the same jobs in one pass
each, on a plain `onnx.ModelProto`, with qonnx's naming conventions (`Conv_3`, `Conv_3_out0`, `Conv_3_param0`,
`global_in`, `global_out`), so the result is what `qonnx.util.cleanup` would give. The executor runs every node
with qonnx's `execute_node` (onnxruntime for standard ops, qonnx's Python for BipolarQuant and friends), exactly
as `qonnx.core.onnx_exec.execute_onnx` does, minus its per-run quadratic checks.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

QONNX_DOMAIN = "qonnx.custom_op.general"
STANDARD_DOMAINS = ("", "ai.onnx")
META_KEY = "bestcompress"
# QONNX ops whose output has the shape of their first input (broadcast with the scale): Mul stands in for them
# during ONNX shape inference.
_ELEMENTWISE_CUSTOM = {"BipolarQuant": "Mul", "Quant": "Mul", "Trunc": "Mul"}


def set_meta(proto: onnx.ModelProto, meta: dict) -> None:
    """Store what the verifier needs (neuron spike tensors, binary-layer nodes, input shape) as JSON metadata."""
    for p in list(proto.metadata_props):
        if p.key == META_KEY:
            proto.metadata_props.remove(p)
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta, default=str))


def get_meta(proto: onnx.ModelProto) -> dict:
    """The bestcompress metadata of an exported graph ({} for a graph bestcompress did not write)."""
    for p in proto.metadata_props:
        if p.key == META_KEY:
            try:
                meta = json.loads(p.value)
            except json.JSONDecodeError:
                return {}
            return meta if isinstance(meta, dict) else {}
    return {}


def static_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every tensor whose ValueInfo has a fully known shape."""
    g = proto.graph
    shapes = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tt.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for init in g.initializer:
        shapes.setdefault(init.name, tuple(init.dims))
    return shapes


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, with QONNX's elementwise quantizers standing in as Mul (their output shape)."""
    hidden = []
    for i, node in enumerate(proto.graph.node):
        if node.domain not in STANDARD_DOMAINS and node.op_type in _ELEMENTWISE_CUSTOM:
            hidden.append((i, node.op_type, node.domain))
            node.op_type, node.domain = _ELEMENTWISE_CUSTOM[node.op_type], ""
            node.input[:] = node.input[:2]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    finally:
        originals = {}
        for i, op, domain in hidden:
            node = proto.graph.node[i]
            node.op_type, node.domain = op, domain
            originals[i] = node
    for i, op, domain in hidden:
        node = inferred.graph.node[i]
        node.op_type, node.domain = op, domain
        del node.input[:]
        node.input.extend(originals[i].input)
    return inferred


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fold_constants(proto: onnx.ModelProto, exclude=("Quant", "BipolarQuant"), max_sweeps: int = 8) -> onnx.ModelProto:
    """Replace every standard node whose inputs are constants (or a Shape of a static tensor) by its value:
    topological sweeps, each followed by shape inference, until nothing is left to fold."""
    for _ in range(max_sweeps):
        proto, changed = _fold_sweep(proto, exclude)
        if not changed:
            break
    return proto


def _fold_sweep(proto: onnx.ModelProto, exclude) -> tuple[onnx.ModelProto, bool]:
    from onnx.reference import ReferenceEvaluator

    g = proto.graph
    consts = {init.name: numpy_helper.to_array(init) for init in g.initializer}
    shapes = static_shapes(proto)
    folded, keep = [], []
    for node in g.node:
        inputs = [i for i in node.input if i]
        values = None
        if node.op_type not in exclude and node.domain in STANDARD_DOMAINS:
            if node.op_type == "Shape" and inputs and inputs[0] in shapes:
                a = _attrs(node)
                dims = shapes[inputs[0]]
                values = [np.array(dims[a.get("start", 0):a.get("end", len(dims))], dtype=np.int64)]
            elif all(i in consts for i in inputs):
                values = ReferenceEvaluator(node).run(None, {i: consts[i] for i in inputs})
        if values is None:
            keep.append(node)
            continue
        for name, value in zip(node.output, values):
            consts[name] = np.asarray(value)
            shapes[name] = tuple(np.asarray(value).shape)
        folded.append(node)
    if not folded:
        return proto, False
    outputs = {o for n in folded for o in n.output}
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(numpy_helper.from_array(consts[name], name) for name in sorted(outputs))
    keep_vi = [vi for vi in g.value_info if vi.name not in outputs]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    return infer_shapes(remove_unused(proto)), True


def remove_identity_arithmetic(proto: onnx.ModelProto, aliases: dict[str, str] | None = None) -> onnx.ModelProto:
    """Bypass `x + 0`, `0 + x`, `x − 0`, `x · 1`, `1 · x` and `x / 1` with a constant 0 or 1 that does not broadcast
    x to a larger shape. Exact: x + 0 may turn −0 into +0, which no later op here can tell apart (a threshold
    compares −0 >= 0 as true, like +0). These come from the zero initial membrane state of every neuron.
    `aliases` (if given) receives {removed tensor: the tensor that replaces it}."""
    g = proto.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    shapes = static_shapes(proto)
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    keep = []
    for node in g.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        through = None
        if node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2 and node.output[0] not in outputs:
            neutral = 0.0 if node.op_type in ("Add", "Sub") else 1.0
            sides = (0, 1) if node.op_type in ("Add", "Mul") else (1,)
            for side in sides:
                c, x = node.input[side], node.input[1 - side]
                if c in consts and x not in consts and consts[c].size and bool(np.all(consts[c] == neutral)):
                    if shapes.get(x) is not None and shapes.get(x) == shapes.get(node.output[0]):
                        through = x
                        break
        if through is not None:
            rename[node.output[0]] = through
        else:
            keep.append(node)
    if aliases is not None:
        aliases.update(rename)
    if not rename:
        return proto
    del g.node[:]
    g.node.extend(keep)
    return remove_unused(proto)


def fold_transpose_into_quant_init(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`init → BipolarQuant → Transpose` becomes `initᵀ → BipolarQuant` (a Linear layer's weight), as qonnx's
    FoldTransposeIntoQuantInit does."""
    g = proto.graph
    inits = {init.name: init for init in g.initializer}
    consumers = Counter(i for n in g.node for i in n.input)
    producer = {o: n for n in g.node for o in n.output}
    drop = []
    for node in g.node:
        if node.op_type != "Transpose" or node.input[0] not in producer:
            continue
        quant = producer[node.input[0]]
        if quant.op_type != "BipolarQuant" or consumers[quant.output[0]] != 1:
            continue
        if quant.input[0] not in inits or consumers[quant.input[0]] != 1 or quant.input[1] not in inits:
            continue
        perm = _attrs(node).get("perm")
        w = numpy_helper.to_array(inits[quant.input[0]])
        perm = list(perm) if perm is not None else list(range(w.ndim))[::-1]
        s = numpy_helper.to_array(inits[quant.input[1]])
        if s.size != 1 and (s.ndim != w.ndim or consumers[quant.input[1]] != 1):
            continue
        inits[quant.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)),
                                                               quant.input[0]))
        if s.size != 1:
            inits[quant.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(s.transpose(perm)),
                                                                   quant.input[1]))
        quant.output[0] = node.output[0]
        drop.append(node)
    if not drop:
        return proto
    dropped = {id(d) for d in drop}
    keep = [n for n in g.node if id(n) not in dropped]
    del g.node[:]
    g.node.extend(keep)
    return infer_shapes(remove_unused(proto))


def with_outputs(proto: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy whose graph also outputs `tensors` (so onnxruntime returns intermediate spike tensors)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    have = {o.name for o in out.graph.output}
    vis = {vi.name: vi for vi in out.graph.value_info}
    for t in tensors:
        if t in have:
            continue
        if t not in vis:
            raise ValueError(f"Tensor '{t}' has no known shape in the graph; it cannot be returned for checking.")
        out.graph.output.append(vis[t])
    return out


def remove_unused(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop initializers and ValueInfos that no node or graph output refers to."""
    g = proto.graph
    used = {i for n in g.node for i in n.input} | {o for n in g.node for o in n.output} | {o.name for o in g.output}
    inits = [i for i in g.initializer if i.name in used]
    vis = [v for v in g.value_info if v.name in used]
    init_names = {x.name for x in inits}
    ins = [i for i in g.input if i.name in used and i.name not in init_names]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]
    g.value_info.extend(vis)
    del g.input[:]
    g.input.extend(ins)
    return proto


def unique_node_names(proto: onnx.ModelProto) -> None:
    """Name every node `<OpType>_<k>` (qonnx's GiveUniqueNodeNames)."""
    count = Counter()
    for node in proto.graph.node:
        node.name = f"{node.op_type}_{count[node.op_type]}"
        count[node.op_type] += 1


def rename_tensors(proto: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere they appear (nodes, graph inputs/outputs, ValueInfo, initializers)."""
    if not mapping:
        return
    g = proto.graph
    for node in g.node:
        node.input[:] = [mapping.get(i, i) for i in node.input]
        node.output[:] = [mapping.get(o, o) for o in node.output]
    for coll in (g.input, g.output, g.value_info, g.initializer):
        for item in coll:
            if item.name in mapping:
                item.name = mapping[item.name]
    for ann in g.quantization_annotation:
        if ann.tensor_name in mapping:
            ann.tensor_name = mapping[ann.tensor_name]


def readable_tensor_names(proto: onnx.ModelProto) -> None:
    """qonnx's GiveReadableTensorNames: `<node>_out<k>`, `<node>_param<k>`, `global_in`, `global_out`."""
    g = proto.graph
    inits = {i.name for i in g.initializer}
    mapping: dict[str, str] = {}
    for node in g.node:
        for k, o in enumerate(node.output):
            mapping.setdefault(o, f"{node.name}_out{k}")
        k = 0
        for i in node.input:
            if i in inits:
                if i not in mapping:
                    mapping[i] = f"{node.name}_param{k}"
                k += 1
    for k, inp in enumerate(g.input):
        mapping[inp.name] = "global_in" if k == 0 else f"global_in_{k}"
    for k, out in enumerate(g.output):
        mapping[out.name] = "global_out" if k == 0 else f"global_out_{k}"
    rename_tensors(proto, {a: b for a, b in mapping.items() if a != b})


# ------------------------------------------------------------------------------------------------- executing

class GraphRunner:
    """Runs a graph node by node as qonnx's `execute_onnx` does: standard ops in onnxruntime (one single-node
    model each, built once and reused across runs), qonnx custom ops (BipolarQuant, ...) with qonnx's own
    Python implementation. Every intermediate tensor can be returned; when only some are asked for, each other
    tensor is dropped after its last reader, so a run holds the live tensors only."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        from qonnx.util.basic import get_preferred_qonnx_opset

        self.proto = proto
        g = proto.graph
        self.opsets = {imp.domain: imp.version for imp in proto.opset_import}
        self.default_opset = get_preferred_qonnx_opset()
        self.constants = {init.name: numpy_helper.to_array(init) for init in g.initializer}
        self.value_info = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}
        for name, value in self.constants.items():
            if name not in self.value_info:
                self.value_info[name] = helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
        self.sessions: dict[int, object] = {}
        self.input_names = [i.name for i in g.input]
        self.output_names = [o.name for o in g.output]

    def _session(self, idx: int, node):
        import onnxruntime as ort

        sess = self.sessions.get(idx)
        if sess is None:
            missing = [t for t in list(node.input) + list(node.output) if t and t not in self.value_info]
            if missing:
                raise ValueError(f"tensor '{missing[0]}' of node '{node.name}' has no known type and shape")
            graph = helper.make_graph([node], "single_node",  # a tensor read twice (Concat(x, x)) is one input
                                      [self.value_info[i] for i in dict.fromkeys(node.input) if i],
                                      [self.value_info[o] for o in node.output])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opsets.get("", 13))])
            model.ir_version = self.proto.ir_version
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            self.sessions[idx] = sess
        return sess

    def run(self, inputs: dict[str, np.ndarray], keep: set[str] | None = None) -> dict[str, np.ndarray]:
        """tensor name -> array for the graph outputs and the `keep` tensors (every tensor when keep is None)."""
        from qonnx.core.execute_custom_node import execute_custom_node

        context = dict(self.constants)
        context.update(inputs)
        g = self.proto.graph
        wanted = None if keep is None else set(self.output_names) | set(keep)
        last_use = self._last_use() if wanted is not None else {}
        for idx, node in enumerate(g.node):
            if node.domain in STANDARD_DOMAINS:
                sess = self._session(idx, node)
                outs = sess.run(None, {i: context[i] for i in node.input if i})
                context.update(zip(node.output, outs))
            else:
                for o in node.output:
                    vi = self.value_info.get(o)
                    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim] if vi is not None else []
                    context[o] = np.zeros(dims, dtype=np.float32)
                execute_custom_node(node, context, g, onnx_opset_version=self.opsets.get(node.domain,
                                                                                         self.default_opset))
            for name in last_use.get(idx, ()):  # hold only the live tensors, not every tensor of the run
                if name not in wanted:
                    context.pop(name, None)
        if wanted is None:
            return context
        return {k: v for k, v in context.items() if k in wanted}

    def _last_use(self) -> dict[int, list[str]]:
        """node index -> the computed tensors whose last reader (or producer, if nothing reads them) it is."""
        if getattr(self, "_last", None) is None:
            last: dict[str, int] = {}
            for idx, node in enumerate(self.proto.graph.node):
                for name in list(node.input) + list(node.output):
                    if name and name not in self.constants:
                        last[name] = idx
            self._last: dict[int, list[str]] = {}
            for name, idx in last.items():
                self._last.setdefault(idx, []).append(name)
        return self._last
