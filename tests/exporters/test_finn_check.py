"""FINN stage checks tell rounding ties from real differences: a spike that flips where PyTorch's membrane lies
within the tie band is accepted and reported (stepwise, end-to-end figures kept); a real flip still fails."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

HAVE_FINN = importlib.util.find_spec("finn") is not None
pytestmark = pytest.mark.skipif(not HAVE_FINN, reason="FINN+ (the [finn] extra) is not installed")


@pytest.fixture(scope="module")
def ready(tiny_mlp_binary):
    """The tiny MLP's FINN-ready graph and spike map, built once (each test corrupts a copy)."""
    from bestcompress.exporters.finn_ready import finn_ready_graph
    x = torch.rand((1,) + tuple(tiny_mlp_binary.bc_input_shape), generator=torch.Generator().manual_seed(3))
    return finn_ready_graph(tiny_mlp_binary, x)[:2]


def _copy(ready):
    from qonnx.core.modelwrapper import ModelWrapper
    return ModelWrapper(ready[0].model, make_deepcopy=True), ready[1]


def _membranes(model, path: str, x: np.ndarray) -> np.ndarray:
    """PyTorch's membrane − V_th of neuron `path` at every step, [T, B, ...]."""
    lif = dict(model.named_modules())[path]
    seen = []
    lif.fire = lambda h, _f=lif.fire: (seen.append((h - lif.v_threshold).detach().numpy()), _f(h))[1]
    try:
        with torch.no_grad():
            model(torch.from_numpy(x))
    finally:
        del lif.fire
    return np.stack(seen, 0)


def _set_threshold(graph, tensor: str, value: float) -> None:
    """The MultiThreshold producing `tensor` gets its own threshold initializer, every entry `value`."""
    node = next(n for n in graph.graph.node if n.output[0] == tensor)
    old = graph.get_initializer(node.input[1])
    node.input[1] = tensor + "/thresholds_changed"
    graph.set_initializer(node.input[1], np.full_like(old, value))


def _corrupt(model, ready, x, nudge: str):
    """The FINN-ready graph with one neuron's threshold at one step moved (the first step tensor where some but
    not all elements fire): 'tie' just past the firing element of smallest margin (only it flips), 'real' down to
    the median membrane (many flip). Returns (graph, spikes, neuron key, tie_eps covering that smallest margin)."""
    from finn.core.onnx_exec import execute_onnx

    graph, spikes = _copy(ready)
    ctx = execute_onnx(graph, {graph.graph.input[0].name: x[:1]}, return_full_exec_context=True)
    for key, (names, kind) in spikes.items():
        for t, tensor in enumerate(names):
            node = next(n for n in graph.graph.node if n.output[0] == tensor)
            thr = graph.get_initializer(node.input[1])
            membrane = ctx[node.input[0]]
            firing = membrane >= thr.flat[0]
            if kind == "tf" and np.unique(thr).size == 1 and firing.any() and (~firing).any():
                break
        else:
            continue
        break
    else:
        pytest.fail("no spike tensor of the tiny MLP has both firing and silent elements")
    smallest = membrane[firing].min()
    at = np.unravel_index(np.argmin(np.where(firing, membrane, np.inf)), membrane.shape)
    margin = float(_membranes(model, key.split("#")[0], x[:1])[t].reshape(membrane.shape)[at])  # PyTorch's units
    assert 0 <= margin < 0.5
    value = np.nextafter(np.float32(smallest), np.float32(np.inf)) if nudge == "tie" else float(np.median(membrane))
    assert nudge == "tie" or value < thr.flat[0] - 1e-3
    _set_threshold(graph, tensor, value)
    return graph, spikes, key, 1.5 * margin + 1e-6


def test_a_tie_flip_is_accepted_and_reported(tiny_mlp_binary, ready):
    from bestcompress.exporters.finn_check import check_stage

    x = np.random.default_rng(3).random((1,) + tuple(tiny_mlp_binary.bc_input_shape), dtype=np.float32)
    graph, spikes, _, eps = _corrupt(tiny_mlp_binary, ready, x, "tie")
    rep = check_stage(tiny_mlp_binary, graph, spikes, x, "random", 1e-4, "finn", tie_eps=eps)
    assert rep.passed and rep.stepwise and rep.ties >= 1
    assert "rounding ties" in rep.message() and "fed PyTorch's input spikes" in rep.message()
    free = rep.end_to_end  # end to end, the same flip does count (and may change the logits)
    assert not free.passed and free.flipped_fraction > 0
    # the same graph with the tie band too narrow for that membrane: the flip is real
    narrow = check_stage(tiny_mlp_binary, graph, spikes, x, "random", 1e-4, "finn", tie_eps=eps / 1e4)
    assert not narrow.passed and "first diverges at neuron" in narrow.message()


def test_a_real_flip_still_fails(tiny_mlp_binary, ready):
    from bestcompress.exporters.finn_check import check_stage

    x = np.random.default_rng(3).random((1,) + tuple(tiny_mlp_binary.bc_input_shape), dtype=np.float32)
    graph, spikes, key, eps = _corrupt(tiny_mlp_binary, ready, x, "real")
    rep = check_stage(tiny_mlp_binary, graph, spikes, x, "random", 1e-4, "finn", tie_eps=eps)
    assert not rep.passed
    assert next(n for n in rep.neurons if n.path == key).flipped > 0
    assert f"first diverges at neuron '{key}'" in rep.message()


def test_an_unchanged_graph_passes_end_to_end(tiny_mlp_binary, ready):
    from bestcompress.exporters.finn_check import check_stage

    x = np.random.default_rng(3).random((2,) + tuple(tiny_mlp_binary.bc_input_shape), dtype=np.float32)
    graph, spikes = _copy(ready)
    rep = check_stage(tiny_mlp_binary, graph, spikes, x, "random", 1e-4, "finn")
    assert rep.passed and not rep.stepwise and rep.ties == 0 and getattr(rep, "end_to_end", None) is None
    assert len(rep.neurons) == len(spikes)
