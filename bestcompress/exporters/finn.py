"""FINN: the QONNX graph through FINN+'s front-end, executed against PyTorch, with a per-node coverage report.

Stages (as FINN's build steps run them, without the Vivado-dependent builder): ConvertQONNXtoFINN; tidy-up
(shapes, constant folding, names, datatypes); Streamline (plus conv lowering and XNOR-popcount for bipolar
MatMuls); the convert-to-hardware-layer transforms (MVAU, Thresholding, pooling, ConvolutionInputGenerator,
elementwise, Concat, DuplicateStreams, ...). A transform that fails is recorded and skipped. The last stage is
executed with FINN's Python executor and compared with PyTorch. The report says, for every node of the last
stage, which FINN hardware layer it became or why it could not, with totals.

FINN+ is an optional extra (its pins conflict with torch 2.13): it is imported only when this format is used.
Synthesis, C++/RTL simulation and bitfiles need Vivado/Vitis and are not attempted.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import ExportError, short_reason
from .formats import ExportFormat, ExportOptions, ExportResult, path_bytes, register_format
from .graph_check import check_domains, graph_batch, graph_input_shape, read_graph, verify_graph
from .verify import compare, verification_inputs

INSTALL_HINT = ('install it with `pip install --no-deps finn-plus==1.6.1` and then `pip install pydantic rich click '
                'pyyaml bitstring psutil "scipy>=1.17,<1.18"` (its own pins would replace the CPU torch)')
HW_DOMAIN = "finn.custom_op.fpgadataflow"
MATRIX_LAYERS = ("MVAU", "VVAU", "MatrixVectorActivation", "VectorVectorActivation")


def _import_finn():
    """FINN+'s front-end entry points, imported on first use."""
    try:
        from finn.core.onnx_exec import execute_onnx
        from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
        from finn.transformation.streamline import Streamline
    except ImportError:
        raise ExportError(f"The finn format needs FINN+, which is not installed; {INSTALL_HINT}.") from None
    return execute_onnx, ConvertQONNXtoFINN, Streamline


def _tidy():
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import GiveReadableTensorNames, GiveUniqueNodeNames, RemoveStaticGraphInputs
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    return [InferShapes(), FoldConstants(), GiveUniqueNodeNames(), GiveReadableTensorNames(), InferDataTypes(),
            RemoveStaticGraphInputs()]


def _batched_convs(model) -> int:
    """Conv nodes whose input batch is not 1 (spiking layers run on T·B-merged batches)."""
    n = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            shape = model.get_tensor_shape(node.input[0])
            n += bool(shape) and shape[0] != 1
    return n


def _streamline(Streamline, model, notes: list[str]):
    import finn.transformation.streamline.absorb as absorb
    from finn.transformation.streamline.reorder import MakeMaxPoolNHWC
    from qonnx.transformation.bipolar_to_xnor import ConvertBipolarMatMulToXnorPopcount
    from qonnx.transformation.general import RemoveUnusedTensors
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul

    lower = [LowerConvsToMatMul(), MakeMaxPoolNHWC(), absorb.AbsorbTransposeIntoMultiThreshold(), MakeMaxPoolNHWC(),
             absorb.AbsorbConsecutiveTransposes()]
    batched = _batched_convs(model)
    if batched:  # FINN's Im2Col lowering assumes batch 1: the lowered graph would not even execute
        notes.append(f"streamline: {batched} Conv node(s) run on a T·B-merged batch; FINN's conv lowering (Im2Col) "
                     "needs batch 1, so convolutions stay ONNX Conv")
        lower = []
    return ([absorb.AbsorbScalarBiasIntoMultiThreshold(), Streamline()] + lower
            + [ConvertBipolarMatMulToXnorPopcount(), Streamline(), InferDataLayouts(), RemoveUnusedTensors()])


def _to_hw():
    from finn.transformation.fpgadataflow.convert_to_hw import (
        binary_matrix_vector_activation as bmva, concat, conv_inp_gen, duplicate_streams,
        elementwise_binary_operation as ew, global_acc_pool, pool, pool_from_reduce,
        quantized_matrix_vector_activation as qmva, requant, split, thresholding, vector_vector_activation as vva,
        where,
    )
    from qonnx.transformation.general import GiveUniqueNodeNames
    return [bmva.InferBinaryMatrixVectorActivation(), qmva.InferQuantizedMatrixVectorActivation(),
            vva.InferVectorVectorActivation(), requant.InferRequantLayer(bitwidth_threshold=9),
            thresholding.InferThresholdingLayer(), pool.InferPool(), pool_from_reduce.InferPoolFromReduce(),
            conv_inp_gen.InferConvInpGen(), concat.InferConcatLayer(), split.InferSplitLayer(),
            ew.InferElementwiseBinaryOperation(), where.InferWhereLayer(),
            global_acc_pool.InferGlobalAccPoolLayer(), duplicate_streams.InferDuplicateStreamsLayer(),
            GiveUniqueNodeNames()]


class _Quiet:
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


def _run_stage(model, transforms, notes: list[str], stage: str):
    for t in transforms:
        try:
            model = model.transform(t)
        except Exception as e:  # FINN raises bare exceptions on graphs it cannot handle: record and go on
            notes.append(f"{stage}: {type(t).__name__} skipped ({type(e).__name__}: {short_reason(e)})")
    return model


# ------------------------------------------------------------------------------------------------- report

def _dtype(model, tensor: str) -> str:
    try:
        return model.get_tensor_datatype(tensor).name
    except Exception:
        return "?"


def _why_not(model, node, inits: set[str], producers: dict) -> str:
    """Why a node stayed a plain (software) ONNX node."""
    op = node.op_type
    dyn = [i for i in node.input if i and i not in inits]
    if op in ("MatMul", "Gemm", "Conv") and len(dyn) >= 2:
        return "activation×activation MatMul (attention): both operands are streams"
    if op in ("MatMul", "Gemm", "Conv"):
        w = next((i for i in node.input if i in inits), None)
        wdt = _dtype(model, w) if w else "?"
        idt = _dtype(model, node.input[0])
        shape = model.get_tensor_shape(node.input[0]) or [1]
        if op == "Conv" and shape[0] != 1:
            kind = "1-bit-weight convolution" if wdt in ("BIPOLAR", "BINARY") else "convolution"
            return f"{kind} over a T·B-merged batch: FINN lowers convolutions (Im2Col) only for batch 1"
        if wdt == "FLOAT32":
            return "full-precision weights (a layer the recipe keeps in fp32: first layer or head)"
        if wdt in ("BIPOLAR", "BINARY") and idt == "FLOAT32":
            return ("1-bit weights, but its input spikes arrive as FLOAT32: the LIF threshold stays a MultiThreshold "
                    "(out_scale 2, then ×0.5), so FINN cannot type the stream as BINARY for an MVAU")
        return f"input is {idt}, not an integer stream (a full-precision value feeds this layer)"
    if op == "MultiThreshold":
        return ("LIF spike threshold: FINN's Thresholding layer needs out_scale 1 and an integer input, but the "
                f"membrane potential is a {_dtype(model, node.input[0])} value of the LIF recurrence over T")
    if op in ("Mul", "Add", "Sub", "Div"):
        if len(dyn) >= 2:
            return ("LIF membrane recurrence / residual stream: float elementwise op of two streams "
                    "(leak, reset, V + (X − V)/τ over T)")
        return "LIF membrane recurrence: float scale/bias (leak 1/τ, reset) not absorbable into a threshold"
    if op in ("Gather", "Slice"):
        return "time unrolling: selects step t of the [T, ...] input of a neuron"
    if op in ("Unsqueeze", "Concat", "Squeeze"):
        return "time axis: repeats the input over T or stacks each step's spikes back into [T, ...]"
    if op in ("Reshape", "Transpose", "Flatten", "Expand", "Tile"):
        return "layout op (T·B merge/split, head split) FINN could not absorb"
    if op in ("ReduceMean", "ReduceSum", "GlobalAveragePool"):
        return "mean over tokens/time of a float stream"
    if op in ("BatchNormalization",):
        return "BatchNorm on a float stream that could not be folded into a threshold"
    if op in ("MaxPool", "MaxPoolNHWC"):
        return "max-pool on a non-integer stream"
    return f"no FINN hardware layer for {op} here"


def coverage(model) -> dict:
    """Per-node report of a FINN model: the hardware layer each node became, or why it did not, and totals."""
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for node in model.graph.node:
        hw = node.domain.startswith(HW_DOMAIN)
        rows.append({"node": node.name, "op_type": node.op_type, "hw": hw,
                     "layer": node.op_type if hw else None,
                     "reason": None if hw else _why_not(model, node, inits, producers)})
    n_hw = sum(r["hw"] for r in rows)
    mvau = sum(r["hw"] and r["op_type"] in MATRIX_LAYERS for r in rows)
    unmapped_weights = sum(not r["hw"] and r["op_type"] in ("MatMul", "Gemm", "Conv") and "1-bit" in r["reason"]
                           for r in rows)  # the reasons name 1-bit weights whenever the weights are BIPOLAR
    return {"nodes": rows,
            "totals": {"nodes": len(rows), "hw": n_hw, "not_mapped": len(rows) - n_hw,
                       "hw_fraction": n_hw / len(rows) if rows else 0.0,
                       "binary_weight_layers": {"mvau": mvau, "not_mapped": unmapped_weights},
                       "by_layer": dict(Counter(r["layer"] for r in rows if r["hw"]).most_common()),
                       "by_reason": dict(Counter(r["reason"] for r in rows if not r["hw"]).most_common())}}


def format_report(report: dict) -> str:
    """The coverage report as a readable text table."""
    lines = [f"{'node':<34} {'op':<26} {'FINN hardware layer / why not'}", "-" * 110]
    for r in report["nodes"]:
        lines.append(f"{r['node']:<34} {r['op_type']:<26} {r['layer'] if r['hw'] else 'not mapped: ' + r['reason']}")
    t = report["totals"]
    w = t["binary_weight_layers"]
    lines += ["-" * 110,
              f"total nodes {t['nodes']}: {t['hw']} hardware layers ({100 * t['hw_fraction']:.1f} %), "
              f"{t['not_mapped']} not mapped; matrix layers with 1-bit weights on MVAU/VVAU: {w['mvau']} of "
              f"{w['mvau'] + w['not_mapped']}"]
    for layer, n in t["by_layer"].items():
        lines.append(f"  {n:>5} × {layer}")
    for reason, n in t["by_reason"].items():
        lines.append(f"  {n:>5} × not mapped: {reason}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the pipeline

def finn_pipeline(qonnx_proto: onnx.ModelProto, progress=None) -> tuple[dict, list[str]]:
    """Run FINN+'s front-end on a QONNX graph.

    Returns:
        ({stage name: qonnx ModelWrapper}, notes on skipped transforms); stages are 'finn' (converted and tidied),
        'streamlined' and 'hw'.
    """
    _, ConvertQONNXtoFINN, Streamline = _import_finn()
    from qonnx.core.modelwrapper import ModelWrapper

    say = progress or (lambda line: None)
    notes: list[str] = []
    with _Quiet():
        model = ModelWrapper(qonnx_proto, make_deepcopy=True)
        say(f"FINN+: ConvertQONNXtoFINN on {len(qonnx_proto.graph.node)} nodes")
        try:
            model = model.transform(ConvertQONNXtoFINN())
        except Exception as e:
            raise ExportError(f"FINN+ could not convert the QONNX graph ({type(e).__name__}: "
                              f"{short_reason(e)}).") from None
        say("FINN+: tidy-up")
        stages = {"finn": _run_stage(model, _tidy(), notes, "tidy-up")}
        say("FINN+: streamline")
        stages["streamlined"] = _run_stage(stages["finn"], _streamline(Streamline, stages["finn"], notes), notes,
                                           "streamline")
        say("FINN+: convert to hardware layers")
        stages["hw"] = _run_stage(stages["streamlined"], _to_hw(), notes, "convert-to-hw")
    return stages, notes


def finn_runner(model):
    """x -> ([outputs], {}) with FINN's Python executor."""
    execute_onnx, _, _ = _import_finn()
    name = model.graph.input[0].name
    outs = [o.name for o in model.graph.output]

    def run(x, feeds):
        with _Quiet():
            res = execute_onnx(model, {name: x})
        return [res[o] for o in outs], {}
    return run


def _atomic_dir(path: Path, build) -> Path:
    """Build a folder next to `path` and move it into place only when `build` succeeded (the one folder writer;
    files go through bestcompress.fileio.atomic_write)."""
    from ..fileio import check_output_path

    parent = path.parent if str(path.parent) else Path(".")
    check_output_path(path, ExportError, folder_ok=True)
    if path.exists() and not path.is_dir():
        raise ExportError(f"Cannot write the FINN export to '{path}': it is a file; give a folder name.")
    if path.is_dir() and any(path.iterdir()) and not (path / "report.json").is_file():
        raise ExportError(f"Folder '{path}' exists and is not a bestcompress FINN export; give a new folder.")
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.tmp"))
    try:
        build(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.old"))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_finn(model: nn.Module, example_input: torch.Tensor, path: str | Path, data=None, samples=None,
                tolerance: float = 1e-4, seed: int = 0, qonnx_proto=None, progress=None):
    """Export to QONNX, run FINN+'s front-end, verify, and write a folder with every stage and the report.

    The folder holds model_qonnx.onnx, model_finn.onnx, model_streamlined.onnx, model_hw.onnx, report.json and
    report.txt. Nothing is left behind when a step or the verification fails.

    Returns:
        (folder, report dict, VerifyReport of the FINN graph); the report dict includes 'verification' for the
        QONNX graph and the FINN hardware-layer graph.
    """
    from .qonnx import to_qonnx

    _import_finn()
    path = Path(path)
    proto = qonnx_proto if qonnx_proto is not None else to_qonnx(model, example_input, progress)
    q_report = verify_graph(proto, model, runtime="qonnx", data=data, samples=samples, tolerance=tolerance, seed=seed,
                            progress=progress)
    if not q_report.passed:
        raise ExportError(q_report.message("The QONNX graph for FINN"))
    t0 = time.perf_counter()
    stages, notes = finn_pipeline(proto, progress)
    seconds = time.perf_counter() - t0
    batch = graph_batch(proto)
    x, kind = verification_inputs(model, tuple(example_input.shape[1:]), batch, data, samples, seed)
    if progress is not None:
        progress("FINN+: running the hardware-layer graph with FINN's Python executor")
    try:
        f_report = compare(model, finn_runner(stages["hw"]), x, batch, [], "finn python executor", tolerance, kind)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"FINN's Python executor cannot run the converted graph ({type(e).__name__}: "
                          f"{short_reason(e, 200)}).") from None
    report = coverage(stages["hw"])
    report["notes"] = notes
    report["stages"] = {name: len(m.graph.node) for name, m in stages.items()}
    report["seconds"] = {"finn_front_end": round(seconds, 2)}
    report["verification"] = {"qonnx": q_report.to_dict(), "finn": f_report.to_dict()}
    if not f_report.passed:
        raise ExportError(f_report.message("The FINN graph"))

    def build(tmp: Path) -> None:
        onnx.save(proto, str(tmp / "model_qonnx.onnx"))
        for name, m in stages.items():
            m.save(str(tmp / f"model_{name}.onnx"))
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.txt").write_text(format_report(report) + "\n")

    return _atomic_dir(path, build), report, f_report


def verify_finn_dir(path: Path, model: nn.Module, data=None, samples=None, tolerance: float = 1e-4, seed: int = 0,
                    progress=None):
    """Re-check a FINN export folder: its hardware-layer graph with FINN's executor (the QONNX graph with qonnx
    when FINN+ is not installed). Both graphs' custom-op domains are checked before anything runs."""
    hw, q = path / "model_hw.onnx", path / "model_qonnx.onnx"
    if not q.is_file():
        raise ExportError(f"Folder '{path}' is not a bestcompress FINN export (no model_qonnx.onnx).")
    proto = read_graph(q)
    check_domains(proto, f"'{q}'")
    try:
        _import_finn()
        have_finn = hw.is_file()
    except ExportError:
        have_finn = False
    if not have_finn:
        return verify_graph(proto, model, runtime="qonnx", data=data, samples=samples, tolerance=tolerance,
                            seed=seed, progress=progress)
    from qonnx.core.modelwrapper import ModelWrapper
    hw_proto = read_graph(hw)
    check_domains(hw_proto, f"'{hw}'")
    m = ModelWrapper(hw_proto)
    x, kind = verification_inputs(model, graph_input_shape(proto), graph_batch(proto), data, samples, seed)
    return compare(model, finn_runner(m), x, graph_batch(proto), [], "finn python executor", tolerance, kind)


# ------------------------------------------------------------------------------------------------ the format

def _export(model: nn.Module, path: Path, opts: ExportOptions) -> ExportResult:
    from .formats import make_readable

    out, report, verification = export_finn(model, opts.example_input, path, opts.data, opts.samples,
                                            opts.tolerance, opts.seed, qonnx_proto=opts.qonnx_graph,
                                            progress=opts.progress)
    make_readable(out)
    return ExportResult(out, "finn", path_bytes(out), 0, verification,
                        extra={"finn": {"totals": report["totals"], "stages": report["stages"],
                                        "notes": report["notes"], "qonnx_verification": report["verification"]["qonnx"]}})


def _verify(path: Path, model: nn.Module, opts: ExportOptions):
    return verify_finn_dir(path, model, opts.data, opts.samples, opts.tolerance, opts.seed, opts.progress)


def _recognise(path: Path) -> bool:
    return path.is_dir()


register_format(ExportFormat(
    "finn", "a folder: QONNX, FINN+ front-end stages, FINN execution check, per-node coverage report", "",
    _export, _verify, _recognise, needs=lambda: _import_finn() and None))
