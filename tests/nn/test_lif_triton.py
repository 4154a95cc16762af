"""The Triton LIF kernels (nn/lif_triton.py) equal the plain per-step loop: spikes bit for bit, H equal to the
torch backend's, input gradients to float rounding, for LIF, IF and the attention-map neuron, both resets,
detach_reset both ways, T=1 and T=7, a neuron count that is not a multiple of the block.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (`interpret=True`: the same kernel bodies,
decorated with Triton's interpret knob set, the knob TRITON_INTERPRET sets); these tests skip when triton is not
installed. The CUDA tests run the real dispatch and skip without a CUDA device."""
import functools

import pytest
import torch

from bestcompress.nn import lif_kernel, lif_triton
from bestcompress.nn.attention import AttentionMapNeuron
from bestcompress.nn.lif import IF, LIF

NEURONS = {
    "lif-hard-detach-sigmoid": lambda: LIF(tau=2.0, v_threshold=0.7, v_reset=0.0),
    "lif-hard-neg-reset-atan-nodecay": lambda: LIF(tau=3.0, v_threshold=0.7, v_reset=-0.2, detach_reset=False,
                                                   decay_input=False, surrogate="atan"),
    "lif-soft-sigmoid": lambda: LIF(tau=3.0, v_threshold=0.7, v_reset=None, detach_reset=False),
    "lif-soft-detach-atan-nodecay": lambda: LIF(tau=2.0, v_threshold=0.6, v_reset=None, decay_input=False,
                                                surrogate="atan"),
    "if-hard": lambda: IF(v_threshold=1.0, detach_reset=False),
    "if-soft-atan": lambda: IF(v_reset=None, surrogate="atan"),
    "map": lambda: AttentionMapNeuron(time_steps=7),
}


def _need_triton():
    missing = lif_triton._import()
    if missing:
        pytest.skip(missing)


def _x(steps, device="cpu"):
    # 3 * 343 = 1029 neurons a step: one full block of 1024 and a block of 5
    return (torch.randn(steps, 3, 343, generator=torch.Generator().manual_seed(steps)) * 1.5).to(device)


def _reference(neuron, x, grad, monkeypatch):
    """Spikes and input gradient of the plain loop (autograd through charge/fire/reset)."""
    monkeypatch.setenv("BESTCOMPRESS_LIF", "reference")
    xs = x.clone().requires_grad_(True)
    s = neuron(xs)
    (s * grad).sum().backward()
    return s.detach(), xs.grad


@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize("name", list(NEURONS))
def test_interpreted_kernels_equal_the_plain_loop(name, steps, monkeypatch):
    _need_triton()
    neuron = NEURONS[name]()
    params = neuron.kernel_params()
    x = _x(steps)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    s_ref, g_ref = _reference(neuron, x, grad, monkeypatch)
    _, h_ref = lif_kernel._torch_forward(x, *params)

    s, h = lif_triton.forward(x, params, True, interpret=True)
    assert 0.05 < s_ref.mean() < 0.95
    assert torch.equal(s, s_ref)
    assert torch.equal(h, h_ref)
    assert torch.equal(lif_triton.forward(x, params, False, interpret=True)[0], s)  # inference: no H
    gx = lif_triton.backward(grad, h, params, False, interpret=True)
    torch.testing.assert_close(gx, g_ref, rtol=1e-6, atol=1e-6)

    # the gradient of a sum: one value broadcast (stride 0), read as that value; written over H in place
    _, g_sum_ref = _reference(neuron, x, torch.ones_like(x), monkeypatch)
    ones = torch.ones(()).expand(x.shape)
    g_sum = lif_triton.backward(ones, h, params, True, interpret=True)
    assert g_sum.data_ptr() == h.data_ptr()
    torch.testing.assert_close(g_sum, g_sum_ref, rtol=1e-6, atol=1e-6)
    assert g_sum.abs().sum() > 0


def test_interpreted_spike_at_the_threshold_itself(monkeypatch):
    """H == V_th fires (H - V_th >= 0), as in the plain loop: an IF neuron charged to exactly 1.0."""
    _need_triton()
    neuron = IF(v_threshold=1.0, v_reset=None)
    x = torch.tensor([[1.0, 0.5, 0.25], [0.5, 0.5, 0.25], [0.0, 0.5, 0.5]])
    s, _ = lif_triton.forward(x, neuron.kernel_params(), True, interpret=True)
    assert s.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert torch.equal(s, _reference(neuron, x, torch.ones_like(x), monkeypatch)[0])


def test_autograd_wiring_with_the_interpreted_kernels(monkeypatch):
    """The dispatch's autograd Function with the 'triton' backend (the kernels interpreted on CPU tensors): the
    same spikes and gradients as the plain loop, and a kept graph keeps H (a second backward gives the same)."""
    _need_triton()
    monkeypatch.setenv("BESTCOMPRESS_LIF", "auto")
    monkeypatch.setattr(lif_kernel, "lif_backend", lambda device="cpu": ("triton", "interpreted for the test"))
    calls = []
    for fn in ("forward", "backward"):
        real = functools.partial(getattr(lif_triton, fn), interpret=True)
        monkeypatch.setattr(lif_triton, fn, lambda *a, _real=real, _fn=fn: calls.append(_fn) or _real(*a))
    neuron = LIF(tau=2.0, v_threshold=0.7, v_reset=None, detach_reset=False)
    x = _x(4)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    xs = x.clone().requires_grad_(True)
    s = neuron(xs)
    (g1,) = torch.autograd.grad((s * grad).sum(), xs, retain_graph=True)
    (g2,) = torch.autograd.grad((s * grad).sum(), xs)
    assert calls == ["forward", "backward", "backward"]
    monkeypatch.undo()
    s_ref, g_ref = _reference(neuron, x, grad, monkeypatch)
    assert torch.equal(s.detach(), s_ref)
    torch.testing.assert_close(g1, g_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(g1, g2)


def test_cpu_tensors_never_take_the_triton_path(monkeypatch):
    """CPU tensors keep the CPU backends even where Triton would be available; lif_backend('cuda') says why
    CUDA tensors would keep the plain loop on this machine."""
    monkeypatch.setenv("BESTCOMPRESS_LIF", "auto")
    monkeypatch.setattr(lif_triton, "available", lambda: (True, "pretend"))
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("triton kernel called for a CPU tensor"))
    monkeypatch.setattr(lif_triton, "forward", boom)
    monkeypatch.setattr(lif_triton, "backward", boom)
    x = _x(3).requires_grad_(True)
    LIF()(x).sum().backward()
    assert lif_kernel.lif_backend()[0] in ("cpp", "torch")
    assert lif_kernel.lif_backend("cuda")[0] == "triton"
    monkeypatch.undo()
    monkeypatch.setenv("BESTCOMPRESS_LIF", "reference")
    assert lif_kernel.lif_backend("cuda") == ("reference", "BESTCOMPRESS_LIF=reference")
    monkeypatch.setenv("BESTCOMPRESS_LIF", "auto")
    monkeypatch.setattr(lif_triton, "_state", {})
    monkeypatch.setattr(lif_triton, "_import", lambda: "triton is not installed (test)")
    assert lif_kernel.lif_backend("cuda") == ("reference", "triton is not installed (test)")


def _need_cuda_triton():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, why = lif_triton.available()
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize("name", list(NEURONS))
def test_cuda_dispatch_equals_the_cpu(name, monkeypatch):
    """On a GPU: the real dispatch runs the compiled Triton kernels on CUDA tensors, with the CPU's spikes bit
    for bit and its gradients to float rounding (the GPU's exp differs in the last bits)."""
    _need_cuda_triton()
    monkeypatch.setenv("BESTCOMPRESS_LIF", "auto")
    assert lif_kernel.lif_backend("cuda")[0] == "triton"
    neuron = NEURONS[name]()
    for steps in (1, 7):
        x = _x(steps)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        s_ref, g_ref = _reference(neuron, x, grad, monkeypatch)
        monkeypatch.setenv("BESTCOMPRESS_LIF", "auto")
        xs = x.cuda().requires_grad_(True)
        s = neuron(xs)
        (s * grad.cuda()).sum().backward()
        assert torch.equal(s.detach().cpu(), s_ref)
        torch.testing.assert_close(xs.grad.cpu(), g_ref, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            assert torch.equal(neuron(x.cuda()).cpu(), s_ref)
        xs = x.cuda().requires_grad_(True)  # the gradient of a sum, and a kept graph
        s = neuron(xs)
        (g1,) = torch.autograd.grad(s.sum(), xs, retain_graph=True)
        (g2,) = torch.autograd.grad(s.sum(), xs)
        _, g_sum_ref = _reference(neuron, x, torch.ones_like(x), monkeypatch)
        torch.testing.assert_close(g1.cpu(), g_sum_ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(g1, g2)


def test_cuda_float64_keeps_the_plain_loop(monkeypatch):
    """Triton's scalar arguments are float32: float64 CUDA tensors run the plain loop, equal to the CPU's."""
    _need_cuda_triton()
    monkeypatch.setenv("BESTCOMPRESS_LIF", "auto")
    calls = []
    real = lif_triton.forward
    monkeypatch.setattr(lif_triton, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _x(4).double()
    s = LIF(v_threshold=0.7)(x.cuda())
    assert calls == [] and torch.equal(s.cpu(), LIF(v_threshold=0.7)(x))
    LIF(v_threshold=0.7)(x.float().cuda())
    assert calls == [1]
