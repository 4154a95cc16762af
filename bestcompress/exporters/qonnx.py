"""QONNX export: Brevitas `export_qonnx` (TorchScript exporter, T unrolled), then qonnx cleanup.

The graph holds `BipolarQuant` on every binary weight and on every LIF spike (s = 0.5·(bipolar(H − V_th) + 1), so
spikes are {0, 1}); the initial membrane state is a constant zero. The batch size is fixed at export time.
What the verifier needs to match graph tensors with PyTorch modules is stored in the model's metadata
(`bestcompress` key, JSON): the spike tensor of every neuron and the BipolarQuant node of every binary layer.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import ExportError
from . import graph as G
from .prepare import TAP_DOMAIN, TAP_OP, binary_layer_paths, export_copy

META_KEY = "bestcompress"
META_VERSION = 1
QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_OPS = ("Quant", "BipolarQuant", "Trunc", "MultiThreshold")


def _short(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


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


def set_meta(proto: onnx.ModelProto, meta: dict) -> None:
    for p in list(proto.metadata_props):
        if p.key == META_KEY:
            proto.metadata_props.remove(p)
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta, default=str))


def get_meta(proto: onnx.ModelProto) -> dict:
    """The bestcompress metadata of an exported graph ({} for a graph bestcompress did not write)."""
    for p in proto.metadata_props:
        if p.key == META_KEY:
            try:
                return json.loads(p.value)
            except json.JSONDecodeError:
                return {}
    return {}


def model_meta(model: nn.Module, example_input: torch.Tensor) -> dict:
    """What an exported graph records about the PyTorch model it came from."""
    from ..model_facts import model_time_steps
    recipe = getattr(model, "bc_recipe", None) or {}
    return {"version": META_VERSION, "input_shape": list(example_input.shape[1:]),
            "batch_size": int(example_input.shape[0]), "time_steps": model_time_steps(model),
            "spec": getattr(model, "bc_spec", None), "recipe": recipe.get("name") if isinstance(recipe, dict) else None}


def to_qonnx(model: nn.Module, example_input: torch.Tensor):
    """Export a binary model to a cleaned-up QONNX graph (in memory).

    Args:
        model: the binary model (left unchanged).
        example_input: a batch of the input; its batch size is baked into the graph.
    Returns:
        The ONNX ModelProto; its metadata records the neuron spike tensors and binary layers.
    """
    with warnings.catch_warnings():  # brevitas warns about optional packages on import
        warnings.simplefilter("ignore")
        from brevitas.export import export_qonnx

    work = export_copy(model)
    layers = binary_layer_paths(work)
    with tempfile.TemporaryDirectory(prefix="bc_export_") as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_qonnx(work, args=example_input, export_path=str(raw), dynamo=False)
            proto = onnx.load(str(raw))
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"The ONNX exporter could not trace the model ({_short(e)}).") from None
    taps = _remove_taps(proto)
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
