"""Verifying an ONNX graph (QONNX or standard) against the PyTorch model it was exported from.

`verify_graph` runs the graph neuron by neuron: `cut_at_spikes` turns every recorded spike tensor into an extra
graph input that the neuron's consumers read, so the graph's own spikes are returned for comparison while PyTorch's
spikes feed what comes after (see verify.py on rounding ties). Each node computes exactly what it computes in the
exported file; only where its spike inputs come from changes. The graph runs in qonnx's node-by-node executor
(QONNX ops) or in onnxruntime (standard ONNX).

Before any executor sees a file, `check_domains` refuses custom-op domains that are not ONNX, QONNX or FINN ones:
qonnx's executor imports the Python module a node's domain names.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ExportError, short_reason
from . import graph as G
from .report import DEFAULT_TOLERANCE, TIE_EPS, VerifyReport
from .verify import GraphFn, compare, verification_inputs

# Every domain whose ops the installed onnxruntime, qonnx or FINN+ implement (qonnx resolves a domain to a module).
KNOWN_DOMAINS = frozenset({
    "", "ai.onnx", "ai.onnx.ml", "com.microsoft",
    "qonnx.custom_op.general", "qonnx.custom_op.channels_last", "onnx.brevitas",
    "finn.custom_op.general", "finn.custom_op.fpgadataflow", "finn.custom_op.fpgadataflow.hls",
    "finn.custom_op.fpgadataflow.rtl",
})
REF_SUFFIX = "::pytorch"


def _nodes(graph):
    """Every node of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _nodes(sub)


def check_domains(proto: onnx.ModelProto, where: str) -> None:
    """Refuse a graph with a node of an unknown custom-op domain (before anything executes it)."""
    for node in _nodes(proto.graph):
        if node.domain not in KNOWN_DOMAINS:
            raise ExportError(f"{where} holds node '{node.name or node.op_type}' of the custom-op domain "
                              f"'{node.domain[:80]}', which is not an ONNX, QONNX or FINN domain, so bestcompress "
                              "will not run it (qonnx would import the Python module that the domain names).")


def read_graph(path: str | Path) -> onnx.ModelProto:
    """An ONNX file as a ModelProto (with its external data), or an ExportError."""
    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except Exception:
        proto = None
    if proto is None or not proto.graph.node:
        raise ExportError(f"'{path}' is neither an ONNX graph, a packed .bcz artifact nor a FINN export folder.")
    return proto


def is_qonnx(proto: onnx.ModelProto) -> bool:
    return any(n.domain not in G.STANDARD_DOMAINS for n in proto.graph.node)


def graph_batch(proto) -> int:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else 1


def graph_input_shape(proto) -> tuple[int, ...]:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return tuple(int(d.dim_value) for d in dims[1:])


# ------------------------------------------------------------------------------------------------ cutting

def cut_at_spikes(proto: onnx.ModelProto, spikes: dict[str, str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of `proto` whose spike tensors are also graph outputs, and whose readers of each spike tensor read
    a new graph input `<tensor>::pytorch` instead (the neuron's PyTorch spikes are fed there).

    Returns:
        (the cut graph, {neuron path: the input that replaces its spike tensor}); a tensor without a known shape
        is left uncut.
    """
    cut = onnx.ModelProto()
    cut.CopyFrom(proto)
    g = cut.graph
    vis = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    fed: dict[str, str] = {}
    for path, tensor in spikes.items():
        vi = vis.get(tensor)
        if vi is None:
            continue
        if tensor not in rename:
            rename[tensor] = tensor + REF_SUFFIX
            ref = onnx.ValueInfoProto()
            ref.CopyFrom(vi)
            ref.name = rename[tensor]
            g.input.append(ref)
            if tensor not in outputs:
                g.output.append(vi)
                outputs.add(tensor)
        fed[path] = rename[tensor]
    for node in g.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    return cut, fed


def _feeds(feeds: dict, fed: dict[str, str]) -> dict[str, np.ndarray]:
    out = {}
    for path, name in fed.items():
        value = feeds.get(path)
        if value is None:
            raise ExportError(f"PyTorch's neuron '{path}' produced no spikes on this input, but the graph has them; "
                              "verify against the model the graph was exported from.")
        out[name] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def qonnx_runner(proto, spikes: dict[str, str], stepwise: bool = True) -> GraphFn:
    """Node-by-node execution with qonnx's executor, returning the spike tensors too."""
    graph, fed = cut_at_spikes(proto, spikes) if stepwise else (proto, {})
    runner = G.GraphRunner(graph)
    name = runner.input_names[0]
    outputs = [o.name for o in proto.graph.output]
    keep = set(spikes.values())

    def run(x, feeds):
        ctx = runner.run({name: x, **_feeds(feeds, fed)}, keep=keep)
        return [ctx[o] for o in outputs], {p: ctx[t] for p, t in spikes.items() if t in ctx}
    return run


def ort_runner(proto, spikes: dict[str, str], stepwise: bool = True, optimize: bool = True) -> GraphFn:
    """onnxruntime with the spike tensors added as graph outputs; `optimize=False` turns its graph optimizations
    (BatchNorm folded into convolutions, fused elementwise ops) off, so the graph's own ops run as written."""
    import onnxruntime as ort

    outputs = [o.name for o in proto.graph.output]
    try:
        if stepwise:
            graph, fed = cut_at_spikes(proto, spikes)
        else:
            graph, fed = G.with_outputs(proto, [t for t in spikes.values()]), {}
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load the graph ({short_reason(e, 200)}).") from None
    names = [o.name for o in sess.get_outputs()]
    name = proto.graph.input[0].name

    def run(x, feeds):
        res = dict(zip(names, sess.run(None, {name: x, **_feeds(feeds, fed)})))
        return [res[o] for o in outputs], {p: res[t] for p, t in spikes.items() if t in res}
    return run


def verify_graph(proto, model: nn.Module, runtime: str | None = None, data=None, samples: int | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, stepwise: bool = True,
                 tie_eps: float = TIE_EPS, progress=None) -> VerifyReport:
    """Verify an exported ONNX/QONNX graph against the PyTorch model it came from.

    Args:
        proto: the ONNX ModelProto (as exported: its metadata maps neurons to graph tensors).
        model: the PyTorch binary model.
        runtime: 'qonnx' or 'onnxruntime'; chosen from the graph's ops when None.
        data: an .npz file with `x` (real inputs); seeded random inputs when None.
        samples: how many inputs to compare (default: 4 or one graph batch; up to 16 rows of data).
        tolerance: largest allowed absolute difference of the outputs.
        stepwise: feed every neuron's consumers PyTorch's spikes (rounding ties cannot cascade); False runs the
            graph end to end on its own spikes.
        tie_eps: how close to V_th a PyTorch membrane counts as a rounding tie.
    Returns:
        The VerifyReport (check `.passed`).
    """
    check_domains(proto, "The graph")
    meta = G.get_meta(proto)
    spikes = {p: t for p, t in (meta.get("spikes") or {}).items() if isinstance(p, str) and isinstance(t, str)}
    runtime = runtime or ("qonnx" if is_qonnx(proto) else "onnxruntime")
    batch = graph_batch(proto)
    shape = graph_input_shape(proto)
    own = getattr(model, "bc_input_shape", None)
    if own is not None and tuple(own) != shape:
        raise ExportError(f"The graph takes inputs of shape {list(shape)} but the PyTorch model takes {list(own)}; "
                          "verify against the model the graph was exported from.")
    x, kind = verification_inputs(model, shape, batch, data, samples, seed)
    if progress is not None:
        progress(f"verifying on {len(x)} {kind} samples with {runtime}"
                 + (", each neuron fed PyTorch's input spikes" if stepwise and spikes else ""))
    run = (qonnx_runner if runtime == "qonnx" else ort_runner)(proto, spikes, stepwise)
    report = compare(model, run, x, batch, list(spikes), runtime, tolerance, kind, stepwise=stepwise and bool(spikes),
                     tie_eps=tie_eps, progress=progress)
    if runtime != "onnxruntime" or report.passed or not report.only_spikes_differ:
        return report
    # Spikes differ, nothing else does: onnxruntime's fusions (a BatchNorm folded into its convolution) round
    # differently, which a model can amplify far past a tie (a BatchNorm channel of zero running variance
    # multiplies by 1/sqrt(eps)). The graph is exact when its ops give PyTorch's spikes run as written.
    plain = compare(model, ort_runner(proto, spikes, stepwise, optimize=False), x, batch, list(spikes),
                    "onnxruntime, graph optimizations off", tolerance, kind, stepwise=stepwise and bool(spikes),
                    tie_eps=tie_eps, progress=progress)
    if not plain.passed:
        return report
    plain.optimized_flips = report.flipped_fraction
    plain.optimized_note = degenerate_batchnorms(model)
    return plain


def degenerate_batchnorms(model: nn.Module) -> str:
    """Which BatchNorms have channels of ~zero running variance (gain ~1/sqrt(eps)), said as a clause or ''."""
    found = []
    for name, m in model.named_modules():
        var = getattr(m, "running_var", None)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(var, torch.Tensor):
            n = int((var <= 1e-3 * m.eps).sum())
            if n:
                found.append((name, n))
    if not found:
        return ""
    total = sum(n for _, n in found)
    return (f"{total} channels of {len(found)} BatchNorms ('{found[0][0]}', ...) have zero running variance, so "
            f"they multiply rounding by 1/sqrt(eps)")


def verify_file_graph(path: str | Path, model: nn.Module, runtime: str, opts) -> VerifyReport:
    """An exported ONNX/QONNX file re-checked against `model` (unknown custom-op domains refused first); `opts`
    is the format's ExportOptions (data, samples, tolerance, seed, progress)."""
    proto = read_graph(path)
    check_domains(proto, f"'{path}'")
    return verify_graph(proto, model, runtime, opts.data, opts.samples, opts.tolerance, opts.seed,
                        progress=opts.progress)
