"""FINN: a FINN-ready graph of the binary model through FINN+'s front-end, executed against PyTorch at every
stage, with a per-node coverage report.

The graph FINN gets is not the generic QONNX export (T·B-merged convolutions, BipolarQuant spikes) but the
FINN-ready graph of finn_unroll.py / finn_ready.py: time steps unrolled as batch-1 streams, spikes as BINARY
MultiThresholds, 1-bit weights BIPOLAR. (A model that is not one fx graph falls back to the QONNX graph through
ConvertQONNXtoFINN, with a note.) Stages, as FINN's build steps run them without the Vivado-dependent builder:
'finn' (tidied: shapes, constants, datatypes), 'streamlined' (Streamline, conv lowering to Im2Col + MatMul,
XNOR-popcount for bipolar×bipolar MatMuls) and 'hw' (MVAU, VVAU, Thresholding, ConvolutionInputGenerator,
elementwise, pooling, DuplicateStreams, ...). A transform that fails is recorded and skipped. Every stage is
executed with FINN's Python executor and compared with PyTorch (logits and, where the spike tensors survived
the transforms, every neuron's spikes; where that differs, again stepwise so that rounding ties are told from
real differences, finn_check.py). finn_coverage.py writes the report.

FINN+ is an optional extra (its pins conflict with torch 2.13): it is imported only when this format is used.
Synthesis, C++/RTL simulation and bitfiles need Vivado/Vitis and are not attempted.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import ExportError, short_reason
from .finn_coverage import coverage, folding_config, format_report
from .finn_ready import Quiet as _Quiet
from .formats import ExportFormat, ExportOptions, ExportResult, path_bytes, register_format
from .graph_check import check_domains, graph_input_shape, read_graph, verify_graph
from .verify import compare, verification_inputs

INSTALL_HINT = ('install it with `pip install --no-deps finn-plus==1.6.1` and then `pip install pydantic rich click '
                'pyyaml bitstring psutil "scipy>=1.17,<1.18"` (its own pins would replace the CPU torch)')


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
    """Shapes, constants, names, datatypes; tensor names are kept (spike tensors are found by name)."""
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import GiveUniqueNodeNames, RemoveStaticGraphInputs
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    return [InferShapes(), FoldConstants(), GiveUniqueNodeNames(), InferDataTypes(), RemoveStaticGraphInputs()]


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

    from .finn_fast import streamline_steps
    from .finn_stream import SplitStreamScale

    lower = [LowerConvsToMatMul(), MakeMaxPoolNHWC(), absorb.AbsorbTransposeIntoMultiThreshold(), MakeMaxPoolNHWC(),
             absorb.AbsorbConsecutiveTransposes()]
    batched = _batched_convs(model)
    if batched:  # FINN's Im2Col lowering assumes batch 1: the lowered graph would not even execute
        notes.append(f"streamline: {batched} Conv node(s) run on a T·B-merged batch; FINN's conv lowering (Im2Col) "
                     "needs batch 1, so convolutions stay ONNX Conv")
        lower = []
    # FINN's Streamline, step by step (finn_fast.py: the same transforms, bookkeeping only after a change)
    # SplitStreamScale: each reader of a quantized stream (reversible.stream_bits) gets its own 2^e Mul to move
    return ([SplitStreamScale(), absorb.AbsorbScalarBiasIntoMultiThreshold()] + streamline_steps() + lower
            + [ConvertBipolarMatMulToXnorPopcount()] + streamline_steps() + [InferDataLayouts(), RemoveUnusedTensors()])


def _to_hw():
    from finn.transformation.fpgadataflow.convert_to_hw import (
        binary_matrix_vector_activation as bmva, concat, conv_inp_gen, duplicate_streams, global_acc_pool, pool,
        pool_from_reduce, quantized_matrix_vector_activation as qmva, requant, split, thresholding,
        vector_vector_activation as vva, where,
    )
    from qonnx.transformation.general import GiveUniqueNodeNames

    from .finn_fast import ElementwiseInOnePass
    return [bmva.InferBinaryMatrixVectorActivation(), qmva.InferQuantizedMatrixVectorActivation(),
            vva.InferVectorVectorActivation(), requant.InferRequantLayer(bitwidth_threshold=9),
            thresholding.InferThresholdingLayer(), pool.InferPool(), pool_from_reduce.InferPoolFromReduce(),
            conv_inp_gen.InferConvInpGen(), concat.InferConcatLayer(), split.InferSplitLayer(),
            ElementwiseInOnePass(), where.InferWhereLayer(),
            global_acc_pool.InferGlobalAccPoolLayer(), duplicate_streams.InferDuplicateStreamsLayer(),
            GiveUniqueNodeNames()]


TIMES: dict[str, float] = {}  # seconds per transform of the last run (the benchmark prints them)


def _run_stage(model, transforms, notes: list[str], stage: str, say=None):
    """Apply each transform (a qonnx Transformation, to its fixpoint, or one of our passes with apply(model) ->
    model), recording its seconds in TIMES and saying one line per transform."""
    from qonnx.transformation.base import Transformation

    for t in transforms:
        t0 = time.perf_counter()
        name = getattr(t, "label", type(t).__name__)
        try:
            model = model.transform(t) if isinstance(t, Transformation) else t.apply(model)
        except Exception as e:  # FINN raises bare exceptions on graphs it cannot handle: record and go on
            notes.append(f"{stage}: {name} skipped ({type(e).__name__}: {short_reason(e)})")
        took = time.perf_counter() - t0
        TIMES[f"{stage}/{name}"] = TIMES.get(f"{stage}/{name}", 0.0) + took
        if say is not None:
            say(f"FINN+: {stage}: {name} {took:.1f} s ({len(model.graph.node)} nodes)")
    return model


# --------------------------------------------------------------------------------------------- the pipeline

def finn_pipeline(start, progress=None, convert_qonnx: bool = False) -> tuple[dict, list[str]]:
    """Run FINN+'s front-end on a FINN-ready graph (a qonnx ModelWrapper) or, with `convert_qonnx`, on a QONNX
    ModelProto through ConvertQONNXtoFINN first.

    Returns:
        ({stage name: qonnx ModelWrapper}, notes on skipped transforms); stages are 'finn' (tidied),
        'streamlined' and 'hw'.
    """
    _, ConvertQONNXtoFINN, Streamline = _import_finn()
    from qonnx.core.modelwrapper import ModelWrapper

    from .finn_index import indexed_lookups

    say = progress or (lambda line: None)
    notes: list[str] = []
    TIMES.clear()
    with _Quiet(), indexed_lookups():  # qonnx's lookups from checked maps: the same graphs, not O(N) per lookup
        if convert_qonnx:
            model = ModelWrapper(start, make_deepcopy=True)
            say(f"FINN+: ConvertQONNXtoFINN on {len(start.graph.node)} nodes")
            try:
                model = model.transform(ConvertQONNXtoFINN())
            except Exception as e:
                raise ExportError(f"FINN+ could not convert the QONNX graph ({type(e).__name__}: "
                                  f"{short_reason(e)}).") from None
        else:
            model = start
        say(f"FINN+: tidy-up ({len(model.graph.node)} nodes)")
        stages = {"finn": _run_stage(model, _tidy(), notes, "tidy-up", say)}
        say("FINN+: streamline")
        stages["streamlined"] = _run_stage(stages["finn"], _streamline(Streamline, stages["finn"], notes), notes,
                                           "streamline", say)
        say("FINN+: convert to hardware layers")
        stages["hw"] = _run_stage(stages["streamlined"], _to_hw(), notes, "convert-to-hw", say)
    return stages, notes


def _finn_ready(model, example_input, progress, notes: list[str]):
    """(FINN-ready ModelWrapper, spike map) or (None, {}) with a note when the model cannot be unrolled."""
    from .finn_ready import finn_ready_graph

    if progress is not None:
        progress("FINN+: building the FINN-ready graph (time steps unrolled, BINARY spikes, BIPOLAR weights)")
    from ..nn.stream_quant import finn_lowering

    try:
        with finn_lowering():  # quantized coupled streams (reversible.stream_bits): MultiThreshold(INTn) -> Mul(2^e)
            wrapper, spikes, more = finn_ready_graph(model, example_input)
    except ExportError as e:
        notes.append(f"FINN-ready graph not built ({e}); the QONNX graph goes through ConvertQONNXtoFINN instead")
        return None, {}
    notes.extend(more)
    return wrapper, spikes


def _check_stage(model, graph, spikes, x, kind, tolerance, stage: str):
    """finn_check.check_stage: end to end, then stepwise (PyTorch's spikes fed) where that differs, so a
    rounding tie is told from a real difference; an executor failure is one sentence."""
    from .finn_check import check_stage
    try:
        return check_stage(model, graph, spikes, x, kind, tolerance, stage)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"FINN's Python executor cannot run the {stage} graph ({type(e).__name__}: "
                          f"{short_reason(e, 200)}).") from None


def _stage_dict(rep) -> dict:
    """A stage's VerifyReport as report.json holds it; a verdict given stepwise keeps the end-to-end figures."""
    d = rep.to_dict()
    free = getattr(rep, "end_to_end", None)
    if free is not None:
        d["end_to_end"] = {"passed": free.passed, "max_abs_diff": float(free.max_abs_diff),
                           "flipped_fraction": free.flipped_fraction,
                           "message": free.message("The graph run end to end")}
    return d


def export_finn(model: nn.Module, example_input: torch.Tensor, path: str | Path, data=None, samples=None,
                tolerance: float = 1e-4, seed: int = 0, qonnx_proto=None, progress=None, strict: bool = True):
    """Export to QONNX and to the FINN-ready graph, run FINN+'s front-end, verify every stage, and write a folder.

    The folder holds model_qonnx.onnx, model_finn.onnx, model_streamlined.onnx, model_hw.onnx, report.json,
    report.txt and folding_config.json. Nothing is left behind when a step or a verification fails; without
    `strict` (benchmarks: coverage and timings of a graph whose check fails), a FINN stage that does not compute
    what PyTorch computes is recorded in the report's notes and 'verification' instead.

    Returns:
        (folder, report dict, VerifyReport of the hardware-layer graph); the report dict includes
        'verification' for the QONNX graph and every FINN stage.
    """
    from .qonnx import to_qonnx

    _import_finn()
    path = Path(path)
    proto = qonnx_proto if qonnx_proto is not None else to_qonnx(model, example_input, progress)
    q_report = verify_graph(proto, model, runtime="qonnx", data=data, samples=samples, tolerance=tolerance, seed=seed,
                            progress=progress)
    if not q_report.passed:
        raise ExportError(q_report.message("The QONNX graph for FINN"))
    t0, c0 = time.perf_counter(), time.process_time()
    notes: list[str] = []
    ready, spikes = _finn_ready(model, example_input, progress, notes)
    stages, more = finn_pipeline(ready if ready is not None else proto, progress, convert_qonnx=ready is None)
    notes.extend(more)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    x, kind = verification_inputs(model, tuple(example_input.shape[1:]), 1, data, samples, seed)
    if ready is not None:
        from .finn_ready import rename_spikes
        probe, _ = verification_inputs(model, tuple(example_input.shape[1:]), 1, None, 1, seed + 7919)
        from .finn_index import indexed_lookups
        for stage in ("streamlined", "hw"):
            with indexed_lookups():
                matched, total = rename_spikes(stages[stage], stages["finn"], spikes, probe)
            if matched < total:
                notes.append(f"{stage}: {matched} of {total} spike tensors matched to neurons (the others hold "
                             "values no other spike tensor tells apart); only matched neurons are compared there")
    checks = {}
    for stage, graph in stages.items():
        if progress is not None:
            progress(f"FINN+: running the {stage} graph with FINN's Python executor on {len(x)} {kind} samples")
        checks[stage] = _check_stage(model, graph, spikes, x, kind, tolerance, stage)
        free = getattr(checks[stage], "end_to_end", None)
        if free is not None:
            notes.append(f"{stage}: {free.message('the graph run end to end')} Stepwise: "
                         f"{checks[stage].message('the graph')}")
        if not checks[stage].passed:
            if strict:
                raise ExportError(checks[stage].message(f"The FINN {stage} graph"))
            notes.append(f"verification failed (not strict): {checks[stage].message(f'the FINN {stage} graph')}")
    report = coverage(stages["hw"])
    report["notes"] = notes
    report["stages"] = {name: len(m.graph.node) for name, m in stages.items()}
    report["seconds"] = {"finn_front_end": round(seconds, 2), "verification": round(time.perf_counter() - t0 - seconds, 2)}
    report["cpu_seconds"] = {"finn_front_end": round(cpu, 2), "verification": round(time.process_time() - c0 - cpu, 2)}
    report["verification"] = {"qonnx": q_report.to_dict(), **{s: _stage_dict(r) for s, r in checks.items()}}
    report["spike_tensors"] = {k: {"steps": v[0], "kind": v[1]} for k, v in spikes.items()}
    report["finn_ready"] = ready is not None

    def build(tmp: Path) -> None:
        onnx.save(proto, str(tmp / "model_qonnx.onnx"))
        for name, m in stages.items():
            m.save(str(tmp / f"model_{name}.onnx"))
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.txt").write_text(format_report(report) + "\n")
        (tmp / "folding_config.json").write_text(json.dumps(folding_config(stages["hw"]), indent=1))

    return _atomic_dir(path, build), report, checks["hw"]


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
    spikes = {}
    try:
        stored = json.loads((path / "report.json").read_text()).get("spike_tensors") or {}
        spikes = {k: (list(v["steps"]), v["kind"]) for k, v in stored.items()
                  if isinstance(v, dict) and v.get("kind") in ("tf", "tb")
                  and all(isinstance(n, str) for n in v.get("steps", []))}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        spikes = {}
    x, kind = verification_inputs(model, graph_input_shape(proto), 1, data, samples, seed)
    return _check_stage(model, ModelWrapper(hw_proto), spikes, x, kind, tolerance, "hw")


# ------------------------------------------------------------------------------------------------ the format

def _export(model: nn.Module, path: Path, opts: ExportOptions) -> ExportResult:
    from .formats import make_readable

    out, report, verification = export_finn(model, opts.example_input, path, opts.data, opts.samples,
                                            opts.tolerance, opts.seed, qonnx_proto=opts.qonnx_graph,
                                            progress=opts.progress)
    make_readable(out)
    return ExportResult(out, "finn", path_bytes(out), 0, verification,
                        extra={"finn": {"totals": report["totals"], "stages": report["stages"],
                                        "notes": report["notes"], "seconds_front_end": report["seconds"],
                                        "cpu_seconds_front_end": report["cpu_seconds"],
                                        "binary_mac_fraction_in_hw": report["binary_mac_fraction_in_hw"],
                                        "nodes_total": report["nodes_total"], "nodes_hw": report["nodes_hw"],
                                        "qonnx_verification": report["verification"]["qonnx"]}})


def _verify(path: Path, model: nn.Module, opts: ExportOptions):
    return verify_finn_dir(path, model, opts.data, opts.samples, opts.tolerance, opts.seed, opts.progress)


def _recognise(path: Path) -> bool:
    return path.is_dir()


register_format(ExportFormat(
    "finn", "a folder: QONNX, the FINN-ready graph through FINN+'s front-end, every stage checked, coverage report",
    "", _export, _verify, _recognise, needs=lambda: _import_finn() and None))
