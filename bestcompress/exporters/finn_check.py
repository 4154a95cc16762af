"""Check a FINN stage against PyTorch, telling rounding ties from real differences.

A stage is first run end to end with FINN's Python executor (logits and every neuron's spikes compared). FINN's
Streamline reorders float arithmetic (scales absorbed into thresholds, adds moved past multiplies), so a membrane
that PyTorch computes within rounding of V_th can fire the other way; run end to end, that one flip changes
everything downstream. When the end-to-end run differs, the stage is run again stepwise, as verify.py checks the
qonnx/onnx graphs: every spike tensor of the stage that is mapped to a neuron (`spike/<neuron>/t<step>`) stays a
graph output, and its readers (the next layers and the neuron's own reset) read PyTorch's spikes instead, fed as
new graph inputs. Each neuron then computes from PyTorch's inputs, so a flip cannot cascade, and a differing spike
counts as a tie only where PyTorch's membrane was within `tie_eps` of the threshold (verify.py's recorder).

The stage passes when the end-to-end run matches, or when it does not and the stepwise run matches with at least
one tie (the ties explain the difference): every non-tie spike flip, every value that is not binary and every
output beyond the tolerance with PyTorch's spikes fed still fails. The end-to-end figures are kept in the report.
"""
from __future__ import annotations

import numpy as np

from .report import TIE_EPS, VerifyReport
from .verify import compare

FED_SUFFIX = "::pytorch"


def cut_spike_tensors(model, spikes: dict[str, tuple[list[str], str]]):
    """A copy of the qonnx ModelWrapper whose readers of each neuron's spike tensors read `<tensor>::pytorch`
    graph inputs instead. Returns (the cut model, {neuron key: ([fed input per step], kind)}); a neuron with a
    step tensor of unknown shape is left uncut (its spikes are still compared, computed from the graph's own)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from onnx import helper

    cut = ModelWrapper(model.model, make_deepcopy=True)
    g = cut.graph
    present = {n for node in g.node for n in node.output}
    rename: dict[str, str] = {}
    fed: dict[str, tuple[list[str], str]] = {}
    for key, (names, kind) in spikes.items():
        shapes = [cut.get_tensor_shape(n) if n in present else None for n in names]
        if not names or any(s is None for s in shapes):
            continue
        for n, shape in zip(names, shapes):
            rename[n] = n + FED_SUFFIX
            g.input.append(helper.make_tensor_value_info(rename[n], 1, shape))  # FLOAT
            cut.set_tensor_datatype(rename[n], cut.get_tensor_datatype(n))
        fed[key] = ([rename[n] for n in names], kind)
    for node in g.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    return cut, fed


def check_stage(model, graph, spikes, x, kind, tolerance, stage: str, tie_eps: float = TIE_EPS) -> VerifyReport:
    """The VerifyReport of one FINN stage (end to end; stepwise where the end-to-end run differs), with
    `end_to_end` (the end-to-end report) set when the stepwise run gave the verdict."""
    from .finn_index import indexed_lookups
    from .finn_ready import finn_runner

    run = finn_runner(graph, spikes)
    runtime = f"finn python executor, {stage}"
    with indexed_lookups():
        free = compare(model, run, x, 1, run.neurons, runtime, tolerance, kind, tie_eps=tie_eps)
    if free.passed or not run.neurons:
        return free
    found = {k: spikes[k] for k in run.neurons}
    with indexed_lookups():
        cut, fed = cut_spike_tensors(graph, found)
    if not fed:
        return free
    stepwise = finn_runner(cut, found, fed=fed)
    with indexed_lookups():
        rep = compare(model, stepwise, x, 1, run.neurons, runtime, tolerance, kind, stepwise=True, tie_eps=tie_eps)
    if rep.passed and rep.ties == 0:  # the stepwise run matches but no tie explains the end-to-end difference
        return free
    rep.end_to_end = free
    return rep
