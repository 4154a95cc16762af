"""Build the FINN-ready graph of a binary model (finn_unroll.py traces it) and run FINN graphs against PyTorch.

`finn_ready_graph` exports `UnrolledModel` with the TorchScript ONNX exporter at batch 1, turns constants into
initializers, marks every ±1 weight BIPOLAR, and names every spike tensor `spike/<neuron>/t<step>` (the
BINARY MultiThresholds appear in the graph in the order the interpreter fired them; a quantized coupled stream's
INTn MultiThreshold is not a spike). `finn_runner` executes a FINN graph with FINN's Python executor and returns,
besides the logits, every neuron whose spike tensors of all steps are still present under those names (FINN's
transforms keep a MultiThreshold's output name when they absorb it into an MVAU or a Thresholding layer), stacked
as PyTorch's neuron returns them.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from torch import fx, nn

from ..errors import ExportError, short_reason
from ..model_facts import model_time_steps
from .finn_index import renamed
from .finn_stream import threshold_out_dtype

SPIKE_PREFIX = "spike/"


def spike_name(key: str, t: int) -> str:
    return f"{SPIKE_PREFIX}{key}/t{t}"


def bipolar_initializers(proto) -> list[str]:
    """Initializers feeding a MatMul/Conv weight input whose values are all ±1."""
    from onnx import numpy_helper
    inits = {i.name: i for i in proto.graph.initializer}
    names = []
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Conv") and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.size and np.all(np.abs(w) == 1.0):
                names.append(node.input[1])
    return names


def constants_to_initializers(proto) -> None:
    """Constant nodes become initializers and Identity nodes disappear, in place (qonnx's FoldConstants would
    execute each Constant node in its own runtime session: minutes on a model of a few hundred nodes)."""
    graph = proto.graph
    rename: dict[str, str] = {}
    keep = []
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1
                and node.attribute[0].name == "value"):
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
        elif node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
        else:
            keep.append(node)
    for node in keep:
        node.input[:] = [rename.get(i, i) for i in node.input]
    del graph.node[:]
    graph.node.extend(keep)


def _static_shape(model, name: str):
    shape = model.get_tensor_shape(name)
    return shape if shape is not None and all(isinstance(d, int) and d > 0 for d in shape) else None


def _fold_shapes(model) -> bool:
    """Shape nodes of tensors whose shape is static become int64 initializers (the batch is fixed at 1), so that
    FoldConstants can fold the Slice/Concat arithmetic a model's reshapes traced into."""
    keep, folded = [], False
    for node in model.graph.node:
        shape = _static_shape(model, node.input[0]) if node.op_type == "Shape" and not node.attribute else None
        if shape:
            model.set_initializer(node.output[0], np.asarray(shape, dtype=np.int64))
            folded = True
        else:
            keep.append(node)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return folded


def fold_constants(model) -> int:
    """Folds, in one topological pass, every standard-ONNX node whose inputs are all initializers and every Shape
    node of a tensor with a static shape (as qonnx's FoldConstants does); the number folded. FoldConstants folds one
    node per pass and repeats, each pass allocating a zero tensor for every tensor of the graph and re-inferring
    all shapes: the shape arithmetic of the full Spikformer-4-384 FINN-ready graph (T = 4, the quantized streams'
    reshapes) made that most of the ~700 CPU s the graph took to build. Each node runs as qonnx runs it
    (`execute_node`, onnxruntime) on a graph holding only its own value infos (a Shape node on zeros of its input's
    shape). The caller repeats it after InferShapes while it folds (a folded shape lets the next reshape's shape be
    inferred); qonnx's FoldConstants still runs afterwards, on what is left (custom-domain nodes)."""
    from onnx import helper
    from qonnx.core.onnx_exec import execute_node
    from qonnx.util.onnx import valueinfo_to_tensor

    opset = model.model.opset_import[0].version
    graph = model.graph
    known = {t.name for t in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.domain not in ("", "ai.onnx") or not node.input or len(node.output) != 1:
            continue
        shape = _static_shape(model, node.input[0]) if node.op_type == "Shape" and len(node.input) == 1 else None
        if shape is not None and node.input[0] not in known:
            info = model.get_tensor_valueinfo(node.input[0])
            if info is None:
                continue
            context = {node.input[0]: valueinfo_to_tensor(info)}  # Shape reads only the shape
        elif all(i in known for i in node.input):
            context = {i: model.get_initializer(i) for i in node.input}
        else:
            continue
        infos = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                 for i, v in context.items()]
        out = model.get_tensor_valueinfo(node.output[0])
        if out is None:
            continue  # no inferred shape: left to FoldConstants
        small = helper.make_graph([node], "fold", [], [], value_info=infos + [out])
        context[out.name] = valueinfo_to_tensor(out)  # the buffer execute_node checks the result's shape against
        execute_node(node, context, small, opset_version=opset)
        graph.node.remove(node)  # first: a tensor is never both produced and initialized (finn_index relies on it)
        model.set_initializer(node.output[0], context[node.output[0]])
        known.add(node.output[0])
        folded += 1
    return folded


def _fires_spikes(node) -> bool:
    """A neuron's MultiThreshold: out_dtype BINARY (a quantized coupled stream's, nn/stream_quant.py, is INTn)."""
    return threshold_out_dtype(node) == "BINARY"


def _name_spikes(proto, spikes: list[tuple[str, int, str]]) -> dict[str, tuple[list[str], str]]:
    """Rename the neurons' (BINARY) MultiThreshold outputs to spike names; {neuron key: ([tensor per step],
    kind)}. The INTn MultiThresholds of quantized coupled streams are not spikes and keep their names."""
    mts = [n for n in proto.graph.node if _fires_spikes(n)]
    if len(mts) != len(spikes):
        return {}
    rename = {}
    out: dict[str, tuple[list[str], str]] = {}
    for node, (key, t, kind) in zip(mts, spikes):
        new = spike_name(key, t)
        rename[node.output[0]] = new
        node.output[0] = new
        out.setdefault(key, ([], kind))[0].append(new)
    for node in proto.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    for o in proto.graph.output:
        if o.name in rename:
            o.name = rename[o.name]
    return out


def finn_ready_graph(model: nn.Module, example_input: torch.Tensor):
    """(qonnx ModelWrapper of the FINN-ready graph, {neuron key: ([spike tensor per step], kind)}, notes).

    Raises ExportError when the model is not an fx graph of a time-first spiking model this interpreter knows.
    """
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import GiveUniqueNodeNames, RemoveUnusedTensors
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    from .finn_graph import FactorConvWeights
    from .finn_index import indexed_lookups
    from .finn_lif import lif_notes, mark_layouts, type_integer_constants
    from .finn_unroll import UnrolledModel

    T = model_time_steps(model)
    if not isinstance(model, fx.GraphModule) or T is None:
        raise ExportError("the model is not one fx graph with a declared number of time steps T")
    unrolled = UnrolledModel(model, T).eval()
    x = example_input[:1].detach().cpu().float()
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(unrolled, (x,), buf, dynamo=False, opset_version=17, input_names=["global_in"],
                              output_names=["global_out"])
    except Exception as e:
        raise ExportError(f"the time-unrolled trace failed ({type(e).__name__}: {short_reason(e)})") from None
    proto = onnx.load_from_string(buf.getvalue())
    constants_to_initializers(proto)
    spikes = _name_spikes(proto, unrolled.log.spikes)
    notes = [f"unrolled: {f} ran on the stacked [T, ...] tensor" for f in dict.fromkeys(unrolled.log.fallbacks)]
    if not spikes and unrolled.log.spikes:
        notes.append("unrolled: spike tensors could not be matched to neurons; only the logits are compared")
    with indexed_lookups():  # qonnx's lookups from checked maps (finn_index.py): the same graph, O(1) lookups
        m = ModelWrapper(proto).transform(InferShapes())
        if _fold_shapes(m):
            m = m.transform(InferShapes())
        while fold_constants(m):  # in waves: a folded shape lets InferShapes resolve the next reshape
            m = m.transform(InferShapes())
        for t in (FoldConstants(), RemoveUnusedTensors()):
            m = m.transform(t)
        m = FactorConvWeights().apply(m)  # 1-bit convolutions with a folded BatchNorm: ±1 weights again
        for t in (GiveUniqueNodeNames(), InferShapes()):
            m = m.transform(t)
        for name in bipolar_initializers(m.model):
            m.set_tensor_datatype(name, DataType["BIPOLAR"])
        m = m.transform(InferDataTypes())
        type_integer_constants(m)  # the integer membranes' constants (finn_lif.py): INT-typed arithmetic
        mark_layouts(m, spikes, unrolled.log.lifs)
    notes += lif_notes(unrolled.log.lifs)
    return m, spikes, notes


class Quiet:
    """FINN prints progress, logs and warns for every node it looks at: keep that out of the user's terminal."""

    def __enter__(self):
        import contextlib
        import io
        import logging

        import warnings

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        self._loggers = [logging.getLogger(n) for n in ("finn_logger", "finn", "qonnx")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)
        self._stack.close()
        return False


def finn_runner(model, spikes: dict[str, tuple[list[str], str]] | None = None, fed: dict | None = None):
    """x -> ([logits], {neuron key: spikes}) with FINN's Python executor, one sample at a time (batch-1 graph);
    with `fed` ({neuron key: ([graph input per step], kind)}, finn_check.cut_spike_tensors), PyTorch's spikes
    (the runner's `feeds`) are fed to those inputs."""
    from finn.core.onnx_exec import execute_onnx

    name = model.graph.input[0].name
    outs = [o.name for o in model.graph.output]
    present = {n for node in model.graph.node for n in node.output}
    found = {k: v for k, v in (spikes or {}).items() if all(n in present for n in v[0])}
    batch = 1
    dims = model.get_tensor_shape(name)
    if dims:
        batch = int(dims[0])

    shapes = {n: model.get_tensor_shape(n) for names, _ in (fed or {}).values() for n in names}

    def run(x, feeds):
        results: list[list[np.ndarray]] = [[] for _ in outs]
        got: dict[str, list[np.ndarray]] = {k: [] for k in found}
        for start in range(0, len(x), batch):
            inputs = {name: x[start:start + batch], **step_feeds(fed or {}, feeds, start, batch, shapes)}
            with Quiet():
                ctx = execute_onnx(model, inputs, return_full_exec_context=bool(found))
            for i, o in enumerate(outs):
                results[i].append(ctx[o])
            for k, (names, kind) in found.items():
                steps = [ctx[n] for n in names]
                got[k].append(np.stack(steps, 0) if kind == "tf" else np.concatenate(steps, 0))
        spikes_out = {k: (np.concatenate(v, 1) if found[k][1] == "tf" else _merge_tb(v, len(found[k][0])))
                      for k, v in got.items()}
        return [np.concatenate(r, 0) for r in results], spikes_out
    run.neurons = list(found)
    return run


def step_feeds(fed: dict, feeds: dict, start: int, batch: int, shapes: dict) -> dict[str, np.ndarray]:
    """The graph inputs of one batch-`batch` run at sample `start`: each fed step tensor from PyTorch's spikes
    ([T, B, ...] for 'tf' neurons, [T·B, ...] t-major for 'tb' ones)."""
    out = {}
    for key, (names, kind) in fed.items():
        ref = feeds.get(key)
        if ref is None:
            continue
        T = len(names)
        per_step = ref if kind == "tf" else ref.reshape((T, -1) + ref.shape[1:])
        for t, name in enumerate(names):
            value = np.ascontiguousarray(per_step[t, start:start + batch], dtype=np.float32)
            out[name] = value.reshape(shapes[name])
    return out


def _merge_tb(chunks: list[np.ndarray], T: int) -> np.ndarray:
    """Per-sample [T·1, ...] spike maps of a time-merged neuron joined into the [T·B, ...] order (t-major)."""
    per = [c.reshape((T, -1) + c.shape[1:]) for c in chunks]
    joined = np.concatenate(per, 1)
    return joined.reshape((-1,) + joined.shape[2:])


def _spike_producers(model) -> list:
    """Nodes that output spikes, in graph order: MultiThresholds, Thresholding layers, MVAUs with thresholds, and
    the Transpose back to NCHW that FINN's Thresholding conversion puts after a channels-last threshold layer."""
    out = []
    spiking = set()
    for node in model.graph.node:
        op = node.op_type
        if op == "MultiThreshold" or op.startswith("Thresholding"):
            out.append(node)
        elif op.startswith("MVAU") and all(not (a.name == "noActivation" and a.i == 1) for a in node.attribute):
            out.append(node)
        elif op == "Transpose" and node.input[0] in spiking:
            out.append(node)
        else:
            continue
        spiking.add(node.output[0])
    return out


def rename_spikes(model, ready, spikes: dict, x: np.ndarray) -> tuple[int, int]:
    """Give the spike tensors of a FINN stage their spike names again (Streamline renames every tensor and may
    reorder nodes): each spike-producing node's output is matched, on input `x`, to the one spike tensor of the
    FINN-ready graph `ready` with exactly the same values; a tensor with no unique match keeps its name (that
    neuron is then not compared at this stage). Returns (matched, total) spike tensors.
    """
    from finn.core.onnx_exec import execute_onnx

    names = [n for steps, _ in spikes.values() for n in steps]
    if not names:
        return 0, 0
    with Quiet():
        ref = execute_onnx(ready, {ready.graph.input[0].name: x}, return_full_exec_context=True)
        got = execute_onnx(model, {model.graph.input[0].name: x}, return_full_exec_context=True)
    outputs = [node.output[0] for node in _spike_producers(model)]
    rename = {}
    for name in names:
        same = [o for o in outputs if o in got and got[o].shape == ref[name].shape and np.array_equal(got[o], ref[name])]
        twins = [n for n in names if ref[n].shape == ref[name].shape and np.array_equal(ref[n], ref[name])]
        if len(same) == 1 and len(twins) == 1:
            rename[same[0]] = name
    for node in model.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]
    for vi in list(model.graph.value_info) + list(model.graph.output):
        vi.name = rename.get(vi.name, vi.name)
    for ann in model.graph.quantization_annotation:
        ann.tensor_name = rename.get(ann.tensor_name, ann.tensor_name)
    renamed()  # in place: finn_index's stamped misses taken before are void
    return len(rename), len(names)
