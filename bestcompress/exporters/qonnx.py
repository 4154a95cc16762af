"""QONNX export: Brevitas `export_qonnx` (TorchScript exporter, T unrolled), then qonnx cleanup.

The graph holds `BipolarQuant` on every binary weight and on every LIF spike (s = 0.5·(bipolar(H − V_th) + 1), so
spikes are {0, 1}); the initial membrane state is a constant zero. The batch size is fixed at export time.
What the verifier needs to match graph tensors with PyTorch modules is stored in the model's metadata
(`bestcompress` key, JSON): the spike tensor of every neuron and the BipolarQuant node of every binary layer.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import ExportError, short_reason
from . import graph as G
from .formats import ExportFormat, ExportOptions, ExportResult, path_bytes, register_format, write_verified
from .graph import META_KEY, get_meta, set_meta  # noqa: F401  (the metadata helpers live with the graph tools)
from .graph_check import is_qonnx, read_graph, verify_file_graph, verify_graph
from .prepare import TAP_DOMAIN, TAP_OP, binary_layer_paths, export_copy

META_VERSION = 1
QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_OPS = ("Quant", "BipolarQuant", "Trunc", "MultiThreshold")


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {short_reason(e, 200)}"


def _remove_taps(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """Drop the SpikeTap markers; returns (module path, tensor name) in graph order."""
    graph = proto.graph
    taps, keep = [], []
    rename: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == TAP_OP and node.domain == TAP_DOMAIN:
            name = next(a.s.decode() for a in node.attribute if a.name == "name")
            src = rename.get(node.input[0], node.input[0])
            rename[node.output[0]] = src
            taps.append((name, src))
        else:
            keep.append(node)
    outputs = {o.name for o in graph.output}
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for node in keep:  # a tap feeding a graph output: let its producer write the output name instead
        for i, name in enumerate(node.output):
            for tapped_out, src in rename.items():
                if src == name and tapped_out in outputs:
                    node.output[i] = tapped_out
                    for other in keep:
                        for j, inp in enumerate(other.input):
                            if inp == name:
                                other.input[j] = tapped_out
                    taps = [(p, tapped_out if t == name else t) for p, t in taps]
    del graph.node[:]
    graph.node.extend(keep)
    for imp in list(proto.opset_import):
        if imp.domain == TAP_DOMAIN:
            proto.opset_import.remove(imp)
    return call_keys(taps)


def call_keys(taps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A module called more than once (e.g. a neuron shared by two heads) gets keys path, path#1, path#2, ..."""
    seen: dict[str, int] = {}
    out = []
    for path, tensor in taps:
        k = seen.get(path, 0)
        seen[path] = k + 1
        out.append((path if k == 0 else f"{path}#{k}", tensor))
    return out


def _cleanup(proto: onnx.ModelProto, taps: list[tuple[str, str]], layers: list[str]):
    """qonnx-style cleanup (shapes, constant folding, transposes folded into weight initializers, unique and
    readable names), keeping track of the tapped spike tensors and of each binary layer's BipolarQuant."""
    for node in proto.graph.node:
        if node.op_type in QONNX_OPS:
            node.domain = QONNX_DOMAIN
    proto = G.infer_shapes(proto)
    proto = G.fold_constants(proto)
    aliases: dict[str, str] = {}
    proto = G.remove_identity_arithmetic(proto, aliases)
    taps = [(path, aliases.get(t, t)) for path, t in taps]
    proto = G.fold_transpose_into_quant_init(proto)
    G.remove_unused(proto)
    G.unique_node_names(proto)
    produced = {out: (node.name, i) for node in proto.graph.node for i, out in enumerate(node.output)}
    sites = []
    for path, tensor in taps:
        if tensor not in produced:
            raise ExportError(f"The output of neuron '{path}' was folded into a constant during export: it does "
                              "not depend on the input.")
        sites.append((path, produced[tensor]))
    wanted = {f"{layer}.weight": layer for layer in layers}
    weights = {wanted[n.input[0]]: n.name for n in proto.graph.node
               if n.op_type == "BipolarQuant" and n.input[0] in wanted}
    G.readable_tensor_names(proto)
    nodes = {n.name: n for n in proto.graph.node}
    outputs = {o.name for o in proto.graph.output}
    spikes, mapping = {}, {}
    for path, (node_name, idx) in sites:
        tensor = nodes[node_name].output[idx]
        if tensor not in outputs:
            mapping[tensor] = f"{path}:spikes"
        spikes[path] = mapping.get(tensor, tensor)
    G.rename_tensors(proto, mapping)
    produced = [o for n in proto.graph.node for o in n.output]
    if len(produced) != len(set(produced)):
        dup = next(o for o in produced if produced.count(o) > 1)
        raise ExportError(f"The exported graph writes tensor '{dup}' twice (not valid ONNX); this is a bug in "
                          "bestcompress's export, please report it.")
    return proto, spikes, weights


def model_meta(model: nn.Module, example_input: torch.Tensor) -> dict:
    """What an exported graph records about the PyTorch model it came from."""
    from ..model_facts import model_time_steps
    recipe = getattr(model, "bc_recipe", None) or {}
    return {"version": META_VERSION, "input_shape": list(example_input.shape[1:]),
            "batch_size": int(example_input.shape[0]), "time_steps": model_time_steps(model),
            "spec": getattr(model, "bc_spec", None), "recipe": recipe.get("name") if isinstance(recipe, dict) else None}


@contextlib.contextmanager
def _no_jit_lint():
    """The TorchScript exporter lints its graph ten times, each quadratic in the graph size (69 s of 123 on a
    136-binary-layer Spikformer); the lint only checks the exporter's own invariants, and the exported graph is
    verified numerically against PyTorch anyway, so it is skipped."""
    lint = torch._C._jit_pass_lint
    torch._C._jit_pass_lint = lambda graph: None
    try:
        yield
    finally:
        torch._C._jit_pass_lint = lint


def to_qonnx(model: nn.Module, example_input: torch.Tensor, progress=None):
    """Export a binary model to a cleaned-up QONNX graph (in memory).

    Args:
        model: the binary model (left unchanged). Only its logits are exported (a tensor; the first tensor of
            a tuple, Nones dropped; a dict's 'logits' or 'out').
        example_input: a batch of the input; its batch size is baked into the graph.
        progress: called with a line as each stage starts.
    Returns:
        The ONNX ModelProto; its metadata records the neuron spike tensors and binary layers.
    """
    with warnings.catch_warnings():  # brevitas warns about optional packages on import
        warnings.simplefilter("ignore")
        from brevitas.export.onnx.qonnx.manager import QONNXManager

    class Manager(QONNXManager):
        # Brevitas' onnxoptimizer pass (constants to initializers, unused initializers) is quadratic in the graph
        # size (17 s of 40 on Spikformer-4-384); _cleanup below does both jobs in linear time.
        run_onnx_passes = False

    say = progress or (lambda line: None)
    work = export_copy(model)
    layers = binary_layer_paths(work)
    say(f"tracing the model with the ONNX exporter ({len(layers)} binary layers)")
    with tempfile.TemporaryDirectory(prefix="bc_export_") as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings(), _no_jit_lint():
                warnings.simplefilter("ignore")
                Manager.export(work, args=example_input, export_path=str(raw), dynamo=False)  # TorchScript
            proto = onnx.load(str(raw))
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"The ONNX exporter could not trace the model ({_short(e)}).") from None
    taps = _remove_taps(proto)
    say(f"cleaning up the graph ({len(proto.graph.node)} nodes)")
    try:
        proto, spikes, weights = _cleanup(proto, taps, layers)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"qonnx could not clean up the exported graph ({_short(e)}).") from None
    meta = model_meta(model, example_input)
    meta.update(format="qonnx", spikes=spikes, weights=weights)
    set_meta(proto, meta)
    return proto


# ------------------------------------------------------------------------------------------------ the format

def qonnx_graph(model: nn.Module, opts: ExportOptions):
    """The QONNX graph of `model`: the one in `opts` when an earlier format of the same export traced it."""
    if opts.qonnx_graph is not None:
        return opts.qonnx_graph
    return to_qonnx(model, opts.example_input, opts.progress)


def _export(model: nn.Module, path: Path, opts: ExportOptions) -> ExportResult:
    proto = qonnx_graph(model, opts)
    report = write_verified(
        path, lambda tmp: onnx.save(proto, str(tmp)),
        lambda tmp: verify_graph(read_graph(tmp), model, "qonnx", opts.data, opts.samples, opts.tolerance, opts.seed,
                                 progress=opts.progress) if opts.verify else None, "The QONNX export")
    return ExportResult(path, "qonnx", path_bytes(path), 0, report)


def _verify(path: Path, model: nn.Module, opts: ExportOptions):
    return verify_file_graph(path, model, "qonnx", opts)


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _recognise(path: Path) -> bool:
    if not path.is_file() or _starts_with(path, b"PK"):  # zip archives: torch checkpoints and .bcz files
        return False
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return bool(proto.graph.node) and is_qonnx(proto)


register_format(ExportFormat(
    "qonnx", "QONNX graph for FINN: BipolarQuant weights, spikes as {0,1} thresholds, T unrolled", ".onnx",
    _export, _verify, _recognise))
