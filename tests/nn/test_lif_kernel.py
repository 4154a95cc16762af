"""The fused LIF (C++ kernel and torch fallback) equals the plain per-step loop: spikes bit for bit, input
gradients to float rounding, for every reset, charge and surrogate variant, LIF, IF and the attention-map neuron."""
import itertools

import pytest
import torch

from bestcompress.nn import lif_kernel
from bestcompress.nn.attention import AttentionMapNeuron
from bestcompress.nn.lif import IF, LIF, ParametricLIF


def _run(neuron, x, backend, monkeypatch):
    monkeypatch.setenv("BESTCOMPRESS_LIF", backend)
    x = x.clone().requires_grad_(True)
    s = neuron(x)
    g = torch.randn_like(s, generator=torch.Generator().manual_seed(1))
    (s * g).sum().backward()
    return s.detach(), x.grad


VARIANTS = list(itertools.product([None, 0.0, -0.2], [True, False], [True, False], ["sigmoid", "atan"], [2.0, 3.0]))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("v_reset,decay_input,detach_reset,surrogate,tau", VARIANTS)
def test_fused_equals_plain_loop(backend, v_reset, decay_input, detach_reset, surrogate, tau, monkeypatch):
    neuron = LIF(tau=tau, v_threshold=0.7, v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset,
                 surrogate=surrogate)
    x = torch.randn(6, 3, 17, 5, generator=torch.Generator().manual_seed(0)) * 1.5
    s_ref, g_ref = _run(neuron, x, "reference", monkeypatch)
    s, g = _run(neuron, x, backend, monkeypatch)
    assert 0.05 < s_ref.mean() < 0.95
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("make", [lambda: IF(v_threshold=1.0), lambda: IF(v_reset=None),
                                  lambda: AttentionMapNeuron(time_steps=4)], ids=["IF", "IF-soft", "map"])
def test_fused_serves_if_and_the_map_neuron(backend, make, monkeypatch):
    x = torch.randn(4, 2, 33, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s_ref, g_ref = _run(make(), x, "reference", monkeypatch)
    s, g = _run(make(), x, backend, monkeypatch)
    assert s.dtype == torch.float64 and torch.equal(s, s_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_fused_path_is_taken_and_plain_kept_where_it_must(monkeypatch):
    monkeypatch.setenv("BESTCOMPRESS_LIF", "auto")
    calls = []
    real = lif_kernel._FusedLIF.apply
    monkeypatch.setattr(lif_kernel._FusedLIF, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.rand(3, 2, 8)
    LIF()(x)
    assert calls == [1]
    ParametricLIF()(x)  # learnable tau: plain loop
    patched = LIF()
    patched.fire = lambda h: (h >= 0).float()  # patched for export: plain loop
    patched(x)
    assert calls == [1]
    assert ParametricLIF().kernel_params() is None and patched.kernel_params() is None
    assert IF().kernel_params()[-1] is True and LIF().kernel_params()[-1] is False


def test_backend_reports_what_runs(monkeypatch):
    monkeypatch.setenv("BESTCOMPRESS_LIF", "reference")
    assert lif_kernel.lif_backend()[0] == "reference"
    monkeypatch.setenv("BESTCOMPRESS_LIF", "bogus")
    with pytest.raises(ValueError):
        lif_kernel.lif_backend()


def test_torch_fallback_when_the_kernel_cannot_be_built(monkeypatch):
    monkeypatch.setenv("BESTCOMPRESS_LIF", "auto")
    monkeypatch.setattr(lif_kernel, "_state", {})
    monkeypatch.setattr(lif_kernel, "_build", lambda: (_ for _ in ()).throw(OSError("no compiler")))
    backend, why = lif_kernel.lif_backend()
    assert backend == "torch" and "no compiler" in why
    monkeypatch.setenv("BESTCOMPRESS_LIF", "cpp")
    with pytest.raises(RuntimeError, match="no compiler"):
        lif_kernel.lif_backend()
