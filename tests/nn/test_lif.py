"""bestcompress LIF / IF / ParametricLIF against spikingjelly, and Leaky against snntorch: spikes exactly equal,
surrogate gradients equal to float tolerance."""
import math

import pytest
import torch

from bestcompress.nn.leaky import Leaky
from bestcompress.nn.lif import IF, LIF, ParametricLIF, heaviside_spike

T, B, F = 6, 3, 40


def _input(seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, F, generator=g) * scale + 0.3


def _run(neuron, x, multi_step=True, weights=None):
    """Spikes and d(sum(spikes * weights))/dx (and /dparams) of a fresh run of `neuron`."""
    if hasattr(neuron, "reset"):
        neuron.reset()
    x = x.clone().requires_grad_(True)
    if multi_step:
        y = neuron(x)
    else:
        outs = [neuron(x[t]) for t in range(x.shape[0])]
        y = torch.stack([o[0] if isinstance(o, tuple) else o for o in outs])
    w = weights if weights is not None else torch.linspace(-1, 1, y.numel()).view_as(y)
    params = [p for p in neuron.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * w).sum(), [x] + params)
    return y.detach(), grads[0], grads[1:]


@pytest.mark.parametrize("v_reset", [0.0, None, -0.25], ids=["hard", "soft", "hard-nonzero"])
@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("detach_reset", [True, False])
def test_lif_equals_spikingjelly_lifnode(v_reset, decay_input, detach_reset):
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    ref = neuron.LIFNode(tau=2.0, decay_input=decay_input, v_reset=v_reset, detach_reset=detach_reset,
                         step_mode="m")  # default surrogate: Sigmoid(alpha=4)
    ours = LIF(tau=2.0, decay_input=decay_input, v_reset=v_reset, detach_reset=detach_reset, alpha=4.0)
    x = _input()
    y_ref, g_ref, _ = _run(ref, x)
    y, g, _ = _run(ours, x)
    assert 0 < y.mean() < 1  # the input makes some, not all, neurons fire
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_lif_atan_surrogate_equals_spikingjelly():
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    ref = neuron.LIFNode(tau=3.0, step_mode="m", surrogate_function=surrogate.ATan(alpha=2.5))
    ours = LIF(tau=3.0, detach_reset=False, alpha=2.5, surrogate="atan")
    (y_ref, g_ref, _), (y, g, _) = _run(ref, _input(1)), _run(ours, _input(1))
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("v_reset", [0.0, None])
def test_if_equals_spikingjelly_ifnode(v_reset):
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    ref = neuron.IFNode(v_reset=v_reset, detach_reset=True, step_mode="m")
    ours = IF(v_reset=v_reset, detach_reset=True)
    (y_ref, g_ref, _), (y, g, _) = _run(ref, _input(2, 0.8)), _run(ours, _input(2, 0.8))
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("decay_input", [True, False])
def test_parametric_lif_equals_spikingjelly_plif_and_loads_its_state_dict(decay_input):
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    ref = neuron.ParametricLIFNode(init_tau=3.0, decay_input=decay_input, step_mode="m")
    with torch.no_grad():
        ref.w.fill_(0.3)  # a trained value, not the init
    ours = ParametricLIF(init_tau=2.0, decay_input=decay_input, detach_reset=False)
    ours.load_state_dict(ref.state_dict(), strict=True)  # same key `w`
    assert ours.tau == pytest.approx(1 / torch.sigmoid(torch.tensor(0.3)).item())
    (y_ref, g_ref, gp_ref), (y, g, gp) = _run(ref, _input(3)), _run(ours, _input(3))
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gp[0], gp_ref[0], rtol=1e-4, atol=1e-6)  # w stays learnable, same gradient


def test_single_step_mode_equals_multi_step_and_resets():
    x = _input(4)
    multi = LIF(tau=2.0)(x)
    step = LIF(tau=2.0, step_mode="s")
    assert torch.equal(torch.stack([step(x[t]) for t in range(T)]), multi)
    step.reset()
    assert torch.equal(torch.stack([step(x[t]) for t in range(T)]), multi)  # reset() starts afresh
    periodic = LIF(tau=2.0, step_mode="s", period=T)
    first = torch.stack([periodic(x[t]) for t in range(T)])
    second = torch.stack([periodic(x[t]) for t in range(T)])  # no reset: the period restarts it
    assert torch.equal(first, multi) and torch.equal(second, multi)


def test_single_step_lif_equals_spikingjelly_single_step():
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    ref = neuron.LIFNode(tau=2.0, step_mode="s")
    ours = LIF(tau=2.0, detach_reset=False, step_mode="s")
    (y_ref, g_ref, _), (y, g, _) = _run(ref, _input(5), False), _run(ours, _input(5), False)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_heaviside_spike_plain_ops_without_grad_and_strict_threshold():
    x = torch.tensor([-1.0, 0.0, 1.0])
    assert heaviside_spike(x).tolist() == [0.0, 1.0, 1.0]
    assert heaviside_spike(x, strict=True).tolist() == [0.0, 0.0, 1.0]
    xg = x.clone().requires_grad_(True)
    heaviside_spike(xg, alpha=2.0, surrogate="atan").sum().backward()
    expected = 1.0 / (1 + (math.pi / 2 * 2.0 * x) ** 2)
    torch.testing.assert_close(xg.grad, expected)


def test_lif_rejects_bad_options():
    with pytest.raises(ValueError):
        LIF(tau=1.0)
    with pytest.raises(ValueError):
        LIF(surrogate="erf")
    with pytest.raises(ValueError):
        LIF(step_mode="x")


@pytest.mark.parametrize("reset_mechanism", ["subtract", "zero", "none"])
@pytest.mark.parametrize("reset_delay", [True, False])
@pytest.mark.parametrize("spike_grad", ["atan", "sigmoid"])
def test_leaky_equals_snntorch_leaky(reset_mechanism, reset_delay, spike_grad):
    snn = pytest.importorskip("snntorch")
    from snntorch import surrogate
    grad_fn, kind, alpha = ((surrogate.atan(alpha=2.0), "atan", 2.0) if spike_grad == "atan"
                            else (surrogate.sigmoid(slope=5), "sigmoid", 5.0))
    ref = snn.Leaky(beta=0.8, threshold=0.7, reset_mechanism=reset_mechanism, reset_delay=reset_delay,
                    spike_grad=grad_fn)
    ours = Leaky(beta=0.8, threshold=0.7, reset_mechanism=reset_mechanism, reset_delay=reset_delay,
                 surrogate=kind, alpha=alpha)
    x = _input(6)
    x.view(-1)[:7] = 0.7  # exactly at threshold: snntorch fires only above it

    def run(neuron):
        xx = x.clone().requires_grad_(True)
        mem, ys = neuron.init_leaky(), []
        for t in range(T):
            s, mem = neuron(xx[t], mem)
            ys.append(s)
        y = torch.stack(ys)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), mem.detach(), xx.grad

    (y_ref, m_ref, g_ref), (y, m, g) = run(ref), run(ours)
    assert torch.equal(y, y_ref) and torch.equal(m, m_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_leaky_keeps_snntorch_state_dict_keys():
    snn = pytest.importorskip("snntorch")
    ref = snn.Leaky(beta=torch.full((5,), 0.7), learn_beta=True, learn_threshold=True)
    ours = Leaky(beta=torch.full((5,), 0.5), learn_beta=True, learn_threshold=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert isinstance(ours.beta, torch.nn.Parameter) and torch.equal(ours.beta, ref.beta)
