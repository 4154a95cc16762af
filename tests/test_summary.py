"""The model summary against a hand count on a tiny model, and on a binarized zoo model."""
from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch import nn

from bestcompress.convert import binarize
from bestcompress.errors import ModelError
from bestcompress.nn.binary import BinaryLinear
from bestcompress.summary import E_AC_PJ, E_MAC_PJ, summarize
from bestcompress.zoo import tiny_model


class Tiny(nn.Module):
    """conv (real input) -> spikes -> fc (spike input) -> bn -> head (real input); plus a spike×spike matmul."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)  # 72 params
        self.fc = nn.Linear(100, 6)  # 606 params
        self.bn = nn.BatchNorm1d(6)  # 12 params
        self.head = nn.Linear(6, 3)  # 21 params
        self.input_shape = (2, 5, 5)

    def forward(self, x):
        s = (self.conv(x) > 0).float()  # [B, 4, 5, 5] spikes
        a = s.flatten(2)
        gram = a @ a.transpose(1, 2)  # [B, 4, 4]: 16 outputs x 25 = 400 MACs, both operands spikes
        y = self.head(self.bn(self.fc(s.flatten(1))))
        return y + gram.sum((1, 2)).unsqueeze(1) * 0


def rows_by_name(summary):
    return {r.name: r for r in summary.rows}


def test_hand_count_full_precision():
    x = torch.randn(3, 2, 5, 5)
    s = summarize(Tiny(), example_input=x)
    r = rows_by_name(s)
    assert (r["conv"].macs, r["conv"].in_bits, r["conv"].w_bits, r["conv"].params) == (4 * 25 * 2 * 9, 32, 32, 72)
    assert (r["fc"].macs, r["fc"].in_bits, r["fc"].params, r["fc"].memory_bytes) == (600, 1, 606, 606 * 4)
    assert (r["head"].macs, r["head"].in_bits) == (18, 32)
    mm = [row for row in s.rows if row.type == "MatMul"]
    assert len(mm) == 1 and mm[0].macs == 400 and mm[0].in_bits == 1 and mm[0].binary_macs == 400
    assert s.macs == 1800 + 600 + 18 + 400
    assert s.binary_macs == 400 and s.binary_layers == 0 and s.weight_layers == 3
    assert s.total_params == 72 + 606 + 12 + 21
    assert s.model_bytes == s.fp32_bytes == 711 * 4 and s.compression == 1.0
    assert s.spike_input_mac_fraction == pytest.approx((600 + 400) / 2818)
    rate = r["fc"].input_rate
    assert 0 < rate < 1
    assert s.sops == pytest.approx(rate * 600 + 400)
    assert s.energy_mj == pytest.approx(((rate * 600 + 400) * E_AC_PJ + 1818 * E_MAC_PJ) * 1e-9)


@pytest.mark.parametrize("scaled, fc_bytes", [(False, 600 / 8 + 6 * 4), (True, 600 / 8 + (6 + 6) * 4)])
def test_hand_count_binary_layer(scaled, fc_bytes):
    model = Tiny()
    model.fc = BinaryLinear.from_float(model.fc, scaled=scaled)
    s = summarize(model)  # example input from model.input_shape
    r = rows_by_name(s)
    assert (r["fc"].w_bits, r["fc"].binary_macs, r["fc"].fp_macs, r["fc"].memory_bytes) == (1, 600, 0, fc_bytes)
    assert s.binary_layers == 1 and s.binary_params == 600
    assert s.binary_macs == 600 + 400
    assert s.binary_mac_fraction == pytest.approx(1000 / 2818)
    assert s.model_bytes == pytest.approx(72 * 4 + fc_bytes + 21 * 4 + 12 * 4)
    assert s.compression == pytest.approx(711 * 4 / s.model_bytes)


def test_binary_weights_fed_32_bit_inputs_do_32_bit_macs():
    """Larq counts a MAC as 1-bit only when the weight AND the input are 1-bit: the head gets real values."""
    model = Tiny()
    model.fc = BinaryLinear.from_float(model.fc)  # spike-fed: 1-bit MACs
    model.head = BinaryLinear.from_float(model.head)  # fed BatchNorm outputs (32-bit): 32-bit MACs
    s = summarize(model)
    r = rows_by_name(s)
    assert (r["head"].w_bits, r["head"].in_bits) == (1, 32)
    assert (r["head"].binary_macs, r["head"].fp_macs) == (0, 18)
    assert (r["fc"].binary_macs, r["fc"].fp_macs) == (600, 0)
    assert s.binary_macs == 600 + 400 and s.binary_layers == 2


class LongName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a_very_long_module_name_for_the_readout_layer = nn.Linear(4096, 1000)  # 4,097,000 params
        self.input_shape = (4096,)

    def forward(self, x):
        return self.a_very_long_module_name_for_the_readout_layer(x)


def test_text_table_fits_80_columns():
    text = summarize(LongName()).to_text()
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "a_very_lon…adout_layer" in text and "4,097,000" in text  # the name is shortened, --csv keeps it
    assert "a_very_long_module_name_for_the_readout_layer" in summarize(LongName()).to_csv()


def test_outputs_and_rendering():
    s = summarize(Tiny())
    d = s.to_dict()
    assert d["macs"] == 2818 and len(d["rows"]) == 4
    lines = s.to_csv().splitlines()
    assert lines[0].startswith("name,type,in_bits,w_bits") and len(lines) == 5
    buf = io.StringIO()
    s.render(Console(file=buf, force_terminal=False))
    text = buf.getvalue()
    assert "fc" in text and "1.0x smaller" in text and "\x1b[" not in text
    buf = io.StringIO()
    s.render(Console(file=buf, force_terminal=True, width=200))
    assert "Linear" in buf.getvalue()


def test_unknown_input_shape_and_bad_shape():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ModelError, match="input shape is unknown"):
        summarize(model)
    with pytest.raises(ModelError, match=r"input of shape \[1, 5\] failed"):
        summarize(model, input_shape=(5,))


def test_binarized_zoo_model():
    fp = tiny_model("spikformer_cifar")
    s_fp = summarize(fp)
    s_bin = summarize(binarize(fp).model)
    assert s_fp.binary_layers == 0 and s_fp.compression == 1.0
    assert s_bin.binary_layers >= 16
    assert s_bin.compression > 10
    assert s_bin.binary_mac_fraction > 0.9
    fp_rows, bin_rows = rows_by_name(s_fp), rows_by_name(s_bin)
    shared = [n for n in fp_rows if n in bin_rows and fp_rows[n].type != "MatMul"]
    assert len(shared) == s_fp.weight_layers  # binarizing swaps layers in place: same names, same MACs
    assert all(fp_rows[n].macs == bin_rows[n].macs for n in shared)
