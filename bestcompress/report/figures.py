"""The report's pictures, drawn with matplotlib (Agg backend, no screen): each function returns PNG bytes."""
from __future__ import annotations

import io
import math

from .sources import Run

KIND_TITLES = {"train": "teacher (full precision)", "distill": "student (binary)", "run": "runs"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _series(run: Run, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in run.records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["epoch"])
            ys.append(float(v))
    return xs, ys


def _keys(runs: list[Run], want) -> list[str]:
    keys = []
    for run in runs:
        for r in run.records:
            for k, v in r.items():
                if k not in keys and isinstance(v, (int, float)) and want(k):
                    keys.append(k)
    return keys


PANELS = (("loss", lambda k: k.endswith("loss")),
          ("top-1 (%)", lambda k: k.endswith("top1") and not k.startswith("best")),  # best_* repeats val/test
          ("learning rate", lambda k: k == "lr"))


def training_curves(runs: list[Run]) -> bytes:
    """Loss, top-1 (train/val/test) and learning rate per epoch: one row per measure, teacher and student runs in
    side-by-side columns, each row on a shared y axis."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    kinds = [k for k in ("train", "distill", "run") if any(r.kind == k for r in runs)]
    fig, axes = plt.subplots(len(PANELS), len(kinds), figsize=(5.2 * len(kinds), 8.4), squeeze=False,
                             sharey="row", sharex="col")
    for col, kind in enumerate(kinds):
        group = [r for r in runs if r.kind == kind]
        for row, (label, want) in enumerate(PANELS):
            ax = axes[row][col]
            for run in group:
                for key in _keys([run], want):
                    xs, ys = _series(run, key)
                    if xs:
                        name = key if len(group) == 1 else f"{run.name}: {key}"
                        ax.plot(xs, ys, marker="o", markersize=3, label=name)
            if row == 0:
                ax.set_title(KIND_TITLES[kind])
            if col == 0:
                ax.set_ylabel(label)
            if row == len(PANELS) - 1:
                ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if label == "learning rate":
                    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            if ax.lines:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    return _png(fig)


def layer_bars(summary, rates: dict[str, float] | None = None) -> bytes:
    """Per layer: weight bits, parameters, MACs split into 1-bit and 32-bit; and each neuron's firing rate."""
    plt = _pyplot()
    rows = summary.rows
    names = [r.name for r in rows]
    panels = 4 if rates else 3
    height = max(3.0, 0.22 * max(len(names), len(rates or {})) + 1.5)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, height), squeeze=False)
    axes = axes[0]
    y = range(len(names))
    axes[0].barh(y, [r.w_bits or 0 for r in rows], color=["tab:green" if r.w_bits == 1 else "tab:gray"
                                                          for r in rows])
    axes[0].set_title("weight bits")
    axes[1].barh(y, [r.params for r in rows], color="tab:blue")
    axes[1].set_title("parameters")
    axes[1].set_xscale("symlog")
    axes[2].barh(y, [r.binary_macs for r in rows], color="tab:green", label="1-bit MACs")
    axes[2].barh(y, [r.fp_macs for r in rows], left=[r.binary_macs for r in rows], color="tab:red",
                 label="32-bit MACs")
    axes[2].set_title("MACs per sample")
    axes[2].set_xscale("symlog")
    axes[2].legend(fontsize=7)
    for ax in axes[:3]:
        ax.set_yticks(list(y))
        ax.set_yticklabels(names if ax is axes[0] else [], fontsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    if rates:
        ax = axes[3]
        ax.barh(range(len(rates)), list(rates.values()), color="tab:orange")
        ax.set_yticks(range(len(rates)))
        ax.set_yticklabels(list(rates), fontsize=7)
        ax.yaxis.tick_right()
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title("neuron firing rate")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(summary.model_name)
    return _png(fig)
