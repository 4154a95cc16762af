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
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


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
    x = torch.rand(3, 2, 8, requires_grad=True)  # (without a graph the kernel runs without the Function)
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


def _kernel():
    module = lif_kernel._cpp()
    if module is None:
        pytest.skip(lif_kernel.lif_backend()[1])
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v_reset,detach_reset,surrogate", [(0.0, True, "sigmoid"), (None, False, "atan"),
                                                            (-0.2, False, "sigmoid")])
def test_every_instruction_set_and_the_gradient_of_a_sum(dtype, v_reset, detach_reset, surrogate, monkeypatch):
    """Each compiled instruction set (baseline, AVX2, AVX-512 where the CPU has them) equals the plain loop, for a
    full gradient and for the gradient of a sum (one broadcast value, read without materialising it); the block
    length is not a multiple of any vector width."""
    kernel = _kernel()
    neuron = LIF(tau=2.0, v_threshold=0.6, v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate)
    x = torch.randn(5, 3, 1031, generator=torch.Generator().manual_seed(2), dtype=dtype) * 1.5
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)

    def run(backend):
        monkeypatch.setenv("BESTCOMPRESS_LIF", backend)
        xs = x.clone().requires_grad_(True)
        s = neuron(xs)
        s.sum().backward()
        return s.detach(), xs.grad

    s_ref, g_ref = run("reference")
    s_full_ref, g_full_ref = _run(neuron, x, "reference", monkeypatch)
    previous = kernel.isa()
    try:
        for isa in kernel.isas():
            kernel.set_isa(isa)
            s, g = run("cpp")
            assert torch.equal(s, s_ref), isa
            torch.testing.assert_close(g, g_ref, **tol)
            s, g = _run(neuron, x, "cpp", monkeypatch)
            assert torch.equal(s, s_full_ref), isa
            torch.testing.assert_close(g, g_full_ref, **tol)
    finally:
        kernel.set_isa(previous)
    with pytest.raises(RuntimeError, match="not available"):
        kernel.set_isa("vax")


def test_a_kept_graph_keeps_the_membrane(monkeypatch):
    """Backward writes the gradient over the saved membrane only when the graph is not kept: with retain_graph a
    second backward gives the same gradient again, and after a plain one autograd refuses a second."""
    _kernel()
    monkeypatch.setenv("BESTCOMPRESS_LIF", "cpp")
    x = (torch.randn(4, 2, 700, generator=torch.Generator().manual_seed(4)) * 2).requires_grad_(True)
    s = LIF()(x)
    (g1,) = torch.autograd.grad(s.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(s.sum(), x, retain_graph=True)
    (g3,) = torch.autograd.grad(s.sum(), x)
    assert g1.abs().sum() > 0
    assert torch.equal(g1, g2) and torch.equal(g1, g3)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(s.sum(), x)


def test_inference_spikes_equal_training_spikes(monkeypatch):
    """Without a graph the kernel skips H; the spikes are the same, for LIF and the attention-map neuron."""
    _kernel()
    x = torch.randn(4, 3, 333, generator=torch.Generator().manual_seed(5)) * 2
    for neuron in (LIF(v_reset=None), AttentionMapNeuron(time_steps=4)):
        monkeypatch.setenv("BESTCOMPRESS_LIF", "reference")
        ref = neuron(x)
        monkeypatch.setenv("BESTCOMPRESS_LIF", "cpp")
        with torch.no_grad():
            s = neuron(x.requires_grad_(True))
        assert not s.requires_grad and torch.equal(s, ref)
        x = x.detach()


def test_buffers_are_reused_from_the_pool_and_behave_as_tensors(monkeypatch):
    """Freed spike/membrane buffers wait in the pool for the next forward of the same size (no fresh pages), at
    most the limit; they are ordinary tensors (resizable, shareable in memory)."""
    kernel = _kernel()
    monkeypatch.setenv("BESTCOMPRESS_LIF", "cpp")
    previous = kernel.set_pool_limit(64 << 20)
    try:
        kernel.set_pool_limit(0)
        kernel.set_pool_limit(64 << 20)
        assert kernel.pool_state() == [0, 64 << 20]
        x = torch.randn(4, 2, 512, 256, generator=torch.Generator().manual_seed(6))  # 4 MiB
        s = LIF()(x)
        ptr = s.data_ptr()
        del s
        held = kernel.pool_state()[0]
        assert held >= x.numel() * 4
        s = LIF()(x)
        assert s.data_ptr() == ptr and kernel.pool_state()[0] == 0
        assert torch.equal(s, LIF()(x.clone()))
        s.resize_(x.numel() + 10).fill_(1.0)  # grows: a new block
        assert s.sum() == x.numel() + 10
        assert torch.equal(LIF()(x).share_memory_(), LIF()(x))
        kernel.set_pool_limit(0)
        assert kernel.pool_state()[0] == 0
    finally:
        kernel.set_pool_limit(previous)
