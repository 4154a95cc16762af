"""StreamQuant (recipe reversible.stream_bits): values on a signed n-bit power-of-two grid, straight-through
gradient, calibrated scale, and the couplings / binarized models / checkpoints that carry it."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bestcompress.convert import binarize
from bestcompress.nn.calibrate import make_it_fire
from bestcompress.nn.reversible import ReversibleCoupling
from bestcompress.nn.stream_quant import StreamQuant, calibrate_stream_scales, stream_quants
from bestcompress.zoo import create_model, get_entry


def _calibrated(bits: int, e: int) -> StreamQuant:
    q = StreamQuant(bits)
    q.exponent.fill_(e)
    q.calibrated.fill_(True)
    return q


def test_values_on_the_grid_rounded_half_up_and_clamped():
    q = _calibrated(4, -2)  # levels -8..7, step 1/4
    z = torch.tensor([0.0, 0.125, 0.124, -0.125, -0.126, 0.3, 1.74, 1.76, 100.0, -2.0, -2.2, -100.0])
    out = q(z)
    levels = out / 0.25
    assert torch.equal(levels, levels.round()) and levels.min() >= -8 and levels.max() <= 7
    expected = torch.tensor([0.0, 0.25, 0.0, 0.0, -0.25, 0.25, 1.75, 1.75, 1.75, -2.0, -2.0, -2.0])
    assert torch.equal(out, expected)  # 0.125 is a tie: up; -0.125 a tie: up to 0; clamped at 7/4 and -8/4


def test_uncalibrated_passes_through_and_bits_are_checked():
    q = StreamQuant(8)
    z = torch.randn(5) * 10
    assert torch.equal(q(z), z)
    for bad in (1, 17, 8.0, True):
        with pytest.raises(ValueError, match="stream bits"):
            StreamQuant(bad)


def test_straight_through_gradient_inside_the_clamp_range_only():
    q = _calibrated(3, 0)  # levels -4..3: inside for z in [-4.5, 3.5)
    z = torch.tensor([-5.0, -4.5, -1.2, 0.4, 3.49, 3.5, 9.0], requires_grad=True)
    (q(z) * torch.arange(1.0, 8.0)).sum().backward()
    assert torch.equal(z.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]))


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.q1, self.q2 = StreamQuant(8), StreamQuant(8)

    def forward(self, x):
        return self.q1(x) + self.q2(3 * x)


def test_calibration_picks_the_smallest_power_of_two_that_holds_the_largest_value():
    m = _Two()
    batches = [torch.tensor([0.5, -5.0]), torch.tensor([2.0, 1.0])]
    assert calibrate_stream_scales(m, iter(batches)) == 2
    # q1 saw max |x| = 5: 127·2^-4 = 7.94 holds it, 127·2^-5 = 3.97 does not; q2 saw 15 -> 2^-3 (15.875)
    assert int(m.q1.exponent) == -4 and int(m.q2.exponent) == -3
    assert bool(m.q1.calibrated) and bool(m.q2.calibrated)
    for top, e in ((127 * 2.0 ** -3, -3), (127 * 2.0 ** -3 + 1e-6, -2), (1.0, -6), (0.0, 0)):
        assert StreamQuant(8).set_range(top) == e, top
    assert calibrate_stream_scales(nn.Linear(2, 2), iter(batches)) == 0
    fresh = _Two()
    assert calibrate_stream_scales(fresh, iter([])) == 0 and not bool(fresh.q1.calibrated)


def test_coupling_quantizes_its_output_and_the_float_form_is_unchanged():
    f, z2, z1 = torch.rand(3, 6), torch.rand(3, 6) * 2, torch.rand(3, 6) * 3
    plain = ReversibleCoupling(2, "mlp", form="preserving")
    quant = ReversibleCoupling(2, "mlp", form="preserving", stream_bits=8)
    assert set(plain.state_dict()) == {"a", "b"}
    assert set(quant.state_dict()) == {"a", "b", "quant.exponent", "quant.calibrated"}
    for c in (plain, quant):
        with torch.no_grad():
            c.a.fill_(0.3)
            c.b.fill_(0.7)
    assert torch.equal(plain(f, z2, z1), f + 0.3 * z2 + 0.7 * z1)  # bit for bit what it computed before
    quant.quant.set_range(5.0)
    out = quant(f, z2, z1)
    assert torch.equal(out * 16, (out * 16).round()) and not torch.equal(out, plain(f, z2, z1))
    assert (out - plain(f, z2, z1)).abs().max() <= 2.0 ** -5 + 1e-7  # at most half a step away
    with pytest.raises(ValueError, match="quantizes its stream"):
        quant.inverse(out, z1, f)


def _seq(recipe: str):
    torch.manual_seed(0)
    source = create_model("spikformer_seq", **get_entry("spikformer_seq").tiny_cfg).eval()
    return binarize(source, recipe).model


def test_default_recipe_unchanged_and_integer_streams_stay_exact():
    plain, finn = _seq("bestformer"), _seq("bestformer_finn")
    assert not stream_quants(plain) and len(stream_quants(finn)) == 1
    sd_plain, sd_finn = plain.state_dict(), finn.state_dict()
    assert set(sd_finn) - set(sd_plain) == {"reversible.z2.quant.exponent", "reversible.z2.quant.calibrated"}
    assert all(torch.equal(sd_plain[k], sd_finn[k]) for k in sd_plain)
    x = torch.rand((3,) + tuple(plain.bc_input_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain(x), finn(x))  # uncalibrated: the float stream
    make_it_fire(plain, plain.bc_input_shape)
    make_it_fire(finn, finn.bc_input_shape)
    assert bool(stream_quants(finn)[0].calibrated)
    with torch.no_grad():  # a = 0, b = 1: the stream is a sum of spikes, an integer the 8-bit grid holds exactly
        assert torch.equal(plain(x), finn(x))


def test_checkpoint_round_trip_keeps_the_grid(tmp_path):
    from bestcompress.checkpoint import save_binary
    from bestcompress.loading import load_binary

    torch.manual_seed(0)
    source = create_model("spikformer_seq", **get_entry("spikformer_seq").tiny_cfg).eval()
    binary = binarize(source, "bestformer_finn").model
    coupling = binary.get_submodule("reversible.z2")
    with torch.no_grad():
        coupling.a.fill_(0.31)
        coupling.b.fill_(0.77)
    make_it_fire(binary, binary.bc_input_shape)
    q = stream_quants(binary)[0]
    assert bool(q.calibrated) and int(q.exponent) < 0
    save_binary(binary, source, tmp_path / "b.pt")
    loaded = load_binary(tmp_path / "b.pt")[0]
    lq = stream_quants(loaded)[0]
    assert bool(lq.calibrated) and int(lq.exponent) == int(q.exponent)
    x = torch.rand((2,) + tuple(binary.bc_input_shape), generator=torch.Generator().manual_seed(2))
    seen = []
    h = lq.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        assert torch.equal(binary.eval()(x), loaded.eval()(x))
    h.remove()
    step = 2.0 ** int(lq.exponent)
    assert seen and torch.equal(seen[0] / step, (seen[0] / step).round())
    assert not torch.equal(seen[0], seen[0].round()) or math.isclose(step, 1.0)  # a·z + b·z' is not an integer
