"""Real norse (1.1.0, installed by scripts/setup.sh): a model written with norse.torch.LIFBoxCell, LIFCell and LIF
as norse's users write it has every neuron canonicalised (verified equal, none kept), binarizes, distills a step and
exports verified QONNX."""
import copy

import pytest
import torch
from torch import nn

norse = pytest.importorskip("norse.torch")

from bestcompress.nn.norse_lif import BoxLIFCell, CurrentLIF, CurrentLIFCell  # noqa: E402
from bestcompress.passes import CanonicalizeNeurons, PassContext  # noqa: E402


class NorseNet(nn.Module):
    """Cells stepped by the model's own loop (state threaded by hand), then norse's LIF over the time axis."""

    def __init__(self, T: int = 5) -> None:
        super().__init__()
        self.T, self.input_shape = T, (6,)
        self.fc, self.fc2, self.fc3, self.head = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 10), \
            nn.Linear(10, 3)
        self.box = norse.LIFBoxCell(norse.LIFBoxParameters(tau_mem_inv=torch.as_tensor(200.0),
                                                           v_th=torch.as_tensor(0.75)))
        self.cell = norse.LIFCell(norse.LIFParameters(tau_syn_inv=torch.as_tensor(150.0), v_th=torch.as_tensor(0.3)))
        self.lif = norse.LIF(norse.LIFParameters(v_th=torch.as_tensor(0.2)), dt=0.002)

    def forward(self, x):
        s1 = s2 = None
        zs = []
        for _ in range(self.T):
            z, s1 = self.box(self.fc(x) * 10, s1)
            z, s2 = self.cell(self.fc2(z) * 10 + 3, s2)
            zs.append(z)
        z, _ = self.lif(self.fc3(torch.stack(zs)) * 5)
        return self.head(z).mean(0)


def _spike_rates(model, x):
    """The firing rate of each norse layer (so the test knows the neurons do fire, and not always)."""
    rates = []
    hooks = [m.register_forward_hook(lambda m, i, o: rates.append(o[0].mean().item()))
             for m in (model.box, model.cell, model.lif)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return rates


def test_real_norse_neurons_are_canonicalised_verified_equal():
    torch.manual_seed(0)
    teacher = NorseNet().eval()
    x = torch.rand(4, 6)
    ctx = PassContext()
    p = CanonicalizeNeurons(ctx)
    out = p.apply(copy.deepcopy(teacher))
    p.check(out)
    assert p.replaced == {"box": "norse LIFBoxCell", "cell": "norse LIFCell", "lif": "norse LIF"} and not p.kept
    assert type(out.box) is BoxLIFCell and type(out.cell) is CurrentLIFCell and type(out.lif) is CurrentLIF
    assert (out.cell.tau_syn_inv, out.lif.dt) == (150.0, 0.002)
    rates = _spike_rates(teacher, x)
    assert all(0 < r < 1 for r in rates), rates
    with torch.no_grad():
        assert torch.equal(out(x), teacher(x))
    # spikes and SuperSpike gradients of the canonical cell equal norse's over many steps of strong input
    cell, ours = norse.LIFCell(), CurrentLIFCell()
    inp = (torch.randn(40, 3, 16) * 3 + 1).requires_grad_(True)
    inp2 = inp.detach().clone().requires_grad_(True)
    zs, zs2, s, s2 = [], [], None, None
    for t in range(40):
        z, s = cell(inp[t], s)
        z2, s2 = ours(inp2[t], s2)
        zs.append(z)
        zs2.append(z2)
    a, b = torch.stack(zs), torch.stack(zs2)
    assert torch.equal(a, b) and 0 < a.mean() < 1
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (b * w).sum().backward()
    assert torch.allclose(inp.grad, inp2.grad, rtol=1e-5, atol=1e-7) and inp.grad.abs().sum() > 0


def test_real_norse_unsupported_settings_are_kept_with_the_reason():
    ctx = PassContext()
    p = CanonicalizeNeurons(ctx)
    model = nn.Sequential(nn.Linear(2, 2), norse.LIFCell(norse.LIFParameters(method="tanh")),
                          norse.LIF(record_states=True), norse.LIFAdExCell())
    p.apply(model)
    assert "threshold method 'tanh'" in p.kept["1"] and "record_states=True" in p.kept["2"]
    assert "no canonical form" in p.kept["3"] and not p.replaced


def test_real_norse_model_binarizes_distills_a_step_and_exports_verified(tmp_path):
    import bestcompress as bc
    from bestcompress.convert import binarize
    from bestcompress.data import load_dataset
    from bestcompress.nn.binary import is_binary_layer
    from bestcompress.training.trainer import distill

    torch.manual_seed(0)
    teacher = NorseNet().eval()
    x = torch.rand(4, 6)
    result = binarize(copy.deepcopy(teacher), "bestformer", example_input=x, overrides={"reversible.enabled": False})
    student = result.model
    assert sum(isinstance(m, (BoxLIFCell, CurrentLIFCell)) for m in student.modules()) == 3
    assert not any(type(m).__module__.startswith("norse.") for m in student.modules())
    assert not any("kept" in n and "CanonicalizeNeurons" in n for n in result.notes)
    assert any(is_binary_layer(m) for m in student.modules())
    data = load_dataset("synthetic", input_shape=(6,), num_classes=3, subset=16)
    before = [q.detach().clone() for q in student.parameters()]
    distill(student, teacher, data, epochs=1, limit_batches=1, log=lambda *a: None,
            overrides={"train.batch_size": 8, "train.calibrate_batches": 0})
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert bc.export(student.eval(), "qonnx", tmp_path / "m.onnx", example_input=x).stat().st_size > 0
