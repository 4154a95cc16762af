"""The one-pass learnable coupling (nn/coupling_kernel.py) equals the plain f + a·z2 + b·z1: z and the tensor
gradients bit for bit, a's and b's gradients to float rounding; other inputs keep the plain expression."""
import pytest
import torch

from bestcompress.nn import coupling_kernel
from bestcompress.nn.coupling_kernel import coupled_sum
from bestcompress.nn.reversible import ReversibleCoupling


@pytest.fixture
def kernel():
    mod = coupling_kernel._cpp()
    if mod is None:
        pytest.skip("the coupling kernel cannot be built here: the plain expression runs everywhere")
    return mod


def _inputs(shape=(4, 3, 50, 37), seed=0, a=-0.3, b=1.25):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(*shape, generator=gen)
    z2 = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)  # a view, as in the model
    z1 = torch.randn(*shape, generator=gen) * 3
    leaves = [t.clone().requires_grad_(True) for t in (f, z2, z1)]
    coef = [torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)]
    return leaves + coef, torch.randn(*shape, generator=gen)


def _grads(fn, inputs, g):
    z = fn(*inputs)
    z.backward(g)
    out = z.detach(), [t.grad.clone() for t in inputs], type(z.grad_fn).__name__
    for t in inputs:
        t.grad = None
    return out


def _plain(f, z2, z1, a, b):
    return f + a.to(f.dtype) * z2 + b.to(f.dtype) * z1


def test_output_and_tensor_gradients_bit_equal(kernel):
    inputs, g = _inputs()
    z0, g0, fn0 = _grads(_plain, inputs, g)
    z1, g1, fn1 = _grads(coupled_sum, inputs, g)
    assert fn1 == "_CouplingBackward" and fn0 != fn1
    assert torch.equal(z0, z1)
    for k in range(3):
        assert torch.equal(g0[k], g1[k]), k
    f, z2, z1_, _, _ = (t.detach().double() for t in inputs)
    for k, other in ((3, z2), (4, z1_)):
        exact = (g.double() * other).sum()
        assert abs(g1[k].item() - exact.item()) <= 1e-5 * abs(exact.item()) + 1e-3
        assert abs(g1[k].item() - g0[k].item()) <= 1e-4 * abs(exact.item()) + 1e-3


def test_the_coupling_module_uses_it_with_the_same_numbers(kernel, monkeypatch):
    torch.manual_seed(0)
    coup = ReversibleCoupling(2, "mlp", form="preserving")
    with torch.no_grad():
        coup.a.fill_(0.37)
        coup.b.fill_(0.81)
    (f, z2, z1, _, _), g = _inputs(seed=3)
    z = coup(f, z2, z1)
    assert type(z.grad_fn).__name__ == "_CouplingBackward"
    z.backward(g)
    ga, gb = coup.a.grad.clone(), coup.b.grad.clone()
    monkeypatch.setitem(coupling_kernel._state, "mod", None)  # the plain expression
    coup.a.grad = coup.b.grad = None
    zp = coup(f, z2, z1)
    assert type(zp.grad_fn).__name__ != "_CouplingBackward" and torch.equal(z, zp)
    zp.backward(g)
    assert torch.allclose(ga, coup.a.grad, rtol=1e-5) and torch.allclose(gb, coup.b.grad, rtol=1e-5)


def test_other_inputs_keep_the_plain_expression(kernel, monkeypatch):
    (f, z2, z1, a, b), _ = _inputs(shape=(2, 3, 4, 5))
    for args in ((f.double(), z2.double(), z1.double(), a, b),     # float64 stream
                 (f, z2[..., :1], z1, a, b),                         # broadcast shape
                 (f, z2, z1, a.double(), b)):                        # float64 coefficient
        z = coupled_sum(*args)
        assert type(z.grad_fn).__name__ != "_CouplingBackward"
        assert torch.equal(z, _plain(*args))
    monkeypatch.setenv("BESTCOMPRESS_COUPLING", "torch")
    monkeypatch.delitem(coupling_kernel._state, "mod")
    assert coupling_kernel._cpp() is None
    assert type(coupled_sum(f, z2, z1, a, b).grad_fn).__name__ != "_CouplingBackward"
