"""The model summary (Larq style): per layer bits, parameters, memory and MACs; totals with the compression.

MACs come from one forward pass with hooks on an example input and count every time step (the real tensor
sizes), per sample. A module called once per step of a time loop (snnTorch style) is one row with the MACs of
all its calls (per step × T); so are the matmuls of an unrolled loop's per-step copies of one attention. A layer's input is 1 bit when every value it received is 0 or 1 (spikes); a MAC counts
as 1-bit only when both its weight and its input are 1 bit (a binary layer fed 32-bit values does 32-bit MACs).
Binary layers store 1 bit per weight plus fp32 bias/scales; every other parameter (BN, lambda, full-precision
layers) is counted at 32 bits. Energy follows METHOD.md §6: spike-fed layers cost E_AC per SOP, others E_MAC per MAC.
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import operator
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .errors import ModelError, short_reason
from .nn.binary import is_binary_layer

E_MAC_PJ = 4.6  # 45 nm, 32-bit float multiply-accumulate (Horowitz)
E_AC_PJ = 0.9  # 45 nm, 32-bit float accumulate
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MATMULS = {torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm,
            torch.Tensor.__rmatmul__}


@dataclass
class LayerRow:
    """One Conv/Linear layer, or one activation×activation matmul (type 'MatMul', no weights)."""

    name: str
    type: str
    in_bits: int
    w_bits: int | None
    params: int
    memory_bytes: float
    macs: int
    binary_macs: int
    fp_macs: int
    input_rate: float | None = None  # mean input value of a spike-fed layer (its firing rate)


@dataclass
class Summary:
    """Per-layer rows and model totals. Sizes are bytes; MACs are per sample, all time steps."""

    model_name: str
    rows: list[LayerRow] = field(default_factory=list)
    total_params: int = 0
    binary_params: int = 0
    model_bytes: float = 0.0
    fp32_bytes: float = 0.0
    compression: float = 1.0
    macs: int = 0
    binary_macs: int = 0
    binary_mac_fraction: float = 0.0
    spike_input_mac_fraction: float = 0.0
    binary_layers: int = 0
    weight_layers: int = 0
    sops: float = 0.0
    energy_mj: float = 0.0

    def totals(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rows",)}

    def to_dict(self) -> dict:
        return {**self.totals(), "rows": [asdict(r) for r in self.rows]}

    def to_csv(self) -> str:
        """One line per layer (header first)."""
        buf = io.StringIO()
        names = [f.name for f in fields(LayerRow)]
        writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
        return buf.getvalue()

    def totals_lines(self) -> list[str]:
        return [
            f"parameters: {self.total_params:,} ({self.binary_params:,} binary, in {self.binary_layers} of "
            f"{self.weight_layers} weight layers)",
            f"model size: {_kb(self.model_bytes)} kB (fp32: {_kb(self.fp32_bytes)} kB, "
            f"{self.compression:.1f}x smaller)",
            f"MACs per sample: {_si(self.macs)} ({self.binary_mac_fraction:.1%} 1-bit, "
            f"{self.spike_input_mac_fraction:.1%} fed by spikes)",
            f"SOPs: {_si(self.sops)}, energy (45 nm): {self.energy_mj:.4g} mJ",
        ]

    NAME_WIDTH = 22  # with the other columns at their widest, a row fits an 80-column terminal

    def _cells(self, r: LayerRow) -> list[str]:
        bits = f"{r.in_bits}/{'-' if r.w_bits is None else r.w_bits}"
        return [_shorten(r.name, self.NAME_WIDTH), r.type, bits, f"{r.params:,}", _kb(r.memory_bytes), _si(r.macs),
                _si(r.binary_macs)]

    HEADERS = ["layer", "type", "in/w", "params", "kB", "MACs", "1-bit"]
    LEGEND = ("in/w: input/weight bits; kB: memory; MACs per sample; 1-bit: MACs with 1-bit inputs and weights "
              "(full names: --csv)")

    def to_text(self) -> str:
        """A plain-text table (rows fit 80 columns; long layer names are shortened in the middle) and the totals."""
        table = [self.HEADERS] + [self._cells(r) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.HEADERS))]
        lines = [f"{self.model_name}"]
        for j, row in enumerate(table):
            lines.append(" ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(row, widths))).rstrip())
            if j == 0:
                lines.append(" ".join("-" * w for w in widths))
        lines.append("")
        lines.extend(_wrap(self.LEGEND))
        lines.extend(self.totals_lines())
        return "\n".join(lines)

    def render(self, console=None) -> None:
        """Print the table: rich in a terminal, plain text otherwise (or without rich)."""
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # pragma: no cover
            print(self.to_text())
            return
        console = console or Console()
        if not console.is_terminal:
            console.print(self.to_text(), markup=False, highlight=False, soft_wrap=True)
            return
        table = Table(title=self.model_name)
        for i, h in enumerate(self.HEADERS):
            table.add_column(h, justify="left" if i < 2 else "right")
        for r in self.rows:
            table.add_row(*self._cells(r))
        console.print(table)
        for line in [self.LEGEND, *self.totals_lines()]:
            console.print(line, markup=False, highlight=False)


def _shorten(text: str, width: int) -> str:
    """`text` cut in the middle to `width` characters ('block.0.a…proj_conv')."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _wrap(text: str, width: int = 80) -> list[str]:
    import textwrap
    return textwrap.wrap(text, width)


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f}"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def _is_spikes(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and bool(((x == 0) | (x == 1)).all())


def _layer_memory(m: nn.Module) -> tuple[int, float, int]:
    """(params, bytes, weight bits) of a weight layer."""
    params = sum(p.numel() for p in m.parameters(recurse=False))
    if is_binary_layer(m):
        w = m.weight.numel()
        scales = m.weight.shape[0] if getattr(m, "binary_scaled", False) else 0
        return params, w / 8 + (params - w + scales) * 4, 1
    return params, params * 4.0, 32


def _macs_per_call(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _graph_matmul_names(model: nn.Module) -> dict[str, list[str]]:
    """For each traced graph: its activation×activation matmul nodes, in execution order, named after the
    module they came from (`block.0.attn.matmul_1`). In a time loop unrolled by the trace (nodes marked with
    `bc_time_step`), the i-th matmul of a module at every step takes the name of its i-th at the first step, so
    the steps add up in one row."""
    funcs = {operator.matmul, torch.matmul, torch.bmm}
    out = {}
    for prefix, gm in model.named_modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        names = []
        per_step: dict[tuple[str, int], list[str]] = {}  # (owner, time step) -> its matmuls' names so far
        first_step: dict[str, int] = {}
        for n in gm.graph.nodes:
            mm = (n.op == "call_function" and n.target in funcs) or (
                n.op == "call_method" and n.target in ("matmul", "bmm", "__matmul__"))
            if not mm or any(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in n.args[:2]):
                continue
            stack = n.meta.get("nn_module_stack") or {}
            owner = next(reversed(stack.values()))[0] if stack else ""
            owner = ".".join(p for p in (prefix, owner) if p)
            name = f"{owner}.{n.name}" if owner else n.name
            step = n.meta.get("bc_time_step")
            if step is not None:
                first = per_step.setdefault((owner, first_step.setdefault(owner, step)), [])
                mine = per_step.setdefault((owner, step), [])
                if mine is not first and len(mine) < len(first):
                    name = first[len(mine)]
                mine.append(name)
            names.append(name)
        out[prefix] = names
    return out


class _Collector(torch.overrides.TorchFunctionMode):
    """Records activation×activation matmuls made outside weight layers, attributed to the innermost module."""

    def __init__(self, stack: list, sink: dict, inside_layer: list, graph_names: dict, order) -> None:
        super().__init__()
        self.stack, self.sink, self.inside_layer, self.graph_names = stack, sink, inside_layer, graph_names
        self.order = order

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS and not self.inside_layer[0] and len(args) >= 2:
            a, b = args[0], args[1]
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not isinstance(a, nn.Parameter)
                    and not isinstance(b, nn.Parameter) and a.dim() >= 2 and b.dim() >= 2):
                frame = self.stack[-1]
                frame[1] += 1
                names = self.graph_names.get(frame[0], [])
                key = names[frame[1] - 1] if frame[1] <= len(names) else f"{frame[0] or '<root>'}.matmul{frame[1]}"
                rec = self.sink.setdefault(key, {"macs": 0, "binary": True, "order": next(self.order)})
                rec["macs"] += out.numel() * a.shape[-1]
                rec["binary"] = rec["binary"] and _is_spikes(a) and _is_spikes(b)
        return out


def summarize(model: nn.Module, example_input: torch.Tensor | None = None, input_shape=None) -> Summary:
    """Bits, parameters, memory and MACs of every weight layer and attention matmul, plus totals.

    Args:
        model: a full-precision or binary model.
        example_input: a batch the model accepts; made from `input_shape` or the model's declared shape if None.
        input_shape: per-sample input shape used when `example_input` is None.
    Returns:
        Summary (`.to_dict()`, `.to_csv()`, `.to_text()`, `.render(console)`).
    """
    from .model_facts import example_input_for, input_shape_hint
    if example_input is None:
        example_input = example_input_for(model, input_shape, batch=1)
        if example_input is None:
            raise ModelError(f"The model's input shape is unknown; {input_shape_hint(model)}.")
    batch = int(example_input.shape[0]) if example_input.dim() else 1
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
    stats = {n: {"macs": 0, "spikes": True, "sum": 0.0, "count": 0, "order": math.inf} for n in layers}
    order = itertools.count()
    stack: list[list] = [["", 0]]
    inside_layer = [0]
    matmuls: dict[str, dict] = {}
    handles = []

    def pre(name):
        def fn(mod, args):
            stack.append([name, 0])
            if name in layers:
                inside_layer[0] += 1
                x = args[0] if args else None
                s = stats[name]
                s["order"] = min(s["order"], next(order))
                spikes = _is_spikes(x)
                s["spikes"] = s["spikes"] and spikes
                if spikes:
                    s["sum"] += float(x.sum())
                    s["count"] += x.numel()
        return fn

    def post(name):
        def fn(mod, args, out):
            stack.pop()
            if name in layers:
                inside_layer[0] -= 1
                if isinstance(out, torch.Tensor):
                    stats[name]["macs"] += _macs_per_call(mod, out)
        return fn

    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _Collector(stack, matmuls, inside_layer, _graph_matmul_names(model), order):
            model(example_input)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ModelError(f"Running the model on an input of shape {list(example_input.shape)} failed "
                         f"({type(e).__name__}: {short_reason(e)}); check --input-shape.") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return _build(model, layers, stats, matmuls, batch)


def _build(model, layers, stats, matmuls, batch) -> Summary:
    summary = Summary(model_name=type(model).__name__)
    when = {}
    layer_params = 0
    for name, m in layers.items():
        params, mem, w_bits = _layer_memory(m)
        layer_params += params
        s = stats[name]
        called = s["macs"] > 0
        spikes = called and s["spikes"]
        macs = s["macs"] // batch
        one_bit = w_bits == 1 and spikes  # a MAC is 1-bit only when its weight AND its input are 1-bit
        rate = s["sum"] / s["count"] if spikes and s["count"] else None
        summary.rows.append(LayerRow(name=name, type=type(m).__name__, in_bits=1 if spikes else 32, w_bits=w_bits,
                                     params=params, memory_bytes=mem, macs=macs,
                                     binary_macs=macs if one_bit else 0, fp_macs=0 if one_bit else macs,
                                     input_rate=rate))
        when[name] = s["order"]
        summary.weight_layers += 1
        summary.binary_layers += int(w_bits == 1)
        summary.binary_params += m.weight.numel() if w_bits == 1 else 0
    for key, rec in matmuls.items():
        macs = rec["macs"] // batch
        summary.rows.append(LayerRow(name=key, type="MatMul", in_bits=1 if rec["binary"] else 32, w_bits=None,
                                     params=0, memory_bytes=0.0, macs=macs,
                                     binary_macs=macs if rec["binary"] else 0, fp_macs=0 if rec["binary"] else macs))
        when[key] = rec["order"]
    summary.rows.sort(key=lambda r: when[r.name])  # execution order; layers never called go last
    total_params = sum(p.numel() for p in model.parameters())
    other = total_params - layer_params
    summary.total_params = total_params
    summary.model_bytes = sum(r.memory_bytes for r in summary.rows) + other * 4.0
    summary.fp32_bytes = total_params * 4.0
    summary.compression = summary.fp32_bytes / summary.model_bytes if summary.model_bytes else 1.0
    summary.macs = sum(r.macs for r in summary.rows)
    summary.binary_macs = sum(r.binary_macs for r in summary.rows)
    spike_macs = sum(r.macs for r in summary.rows if r.in_bits == 1)
    summary.binary_mac_fraction = summary.binary_macs / summary.macs if summary.macs else 0.0
    summary.spike_input_mac_fraction = spike_macs / summary.macs if summary.macs else 0.0
    # SOPs: spike-fed weight layers do rate × MACs accumulates; spike×spike matmuls are counted whole.
    summary.sops = sum((r.input_rate if r.input_rate is not None else 1.0) * r.macs
                       for r in summary.rows if r.in_bits == 1)
    dense = summary.macs - spike_macs
    summary.energy_mj = (summary.sops * E_AC_PJ + dense * E_MAC_PJ) * 1e-9
    return summary
