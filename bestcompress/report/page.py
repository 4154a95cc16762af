"""The report as one self-contained HTML page: inline CSS, figures embedded as base64 PNG, no script, no network."""
from __future__ import annotations

import base64
import html
import math

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .7em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.note{color:#666;font-size:.9em}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(v) -> str:
    return f"{v:.2f} %" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def summary_rows(report) -> list[list]:
    """One row per model: the figures `inspect` and `evaluate` print."""
    rows = []
    for m in report.models:
        s = m.summary
        rows.append([m.path.name, m.kind, _pct(m.scores["top1"]) if m.scores else "–",
                     f"{s.model_bytes / 1000:,.1f}", f"{s.fp32_bytes / 1000:,.1f}", f"{s.compression:.1f}x",
                     f"{s.binary_mac_fraction:.1%}", f"{s.sops:,.0f}", f"{s.energy_mj:.4g}"])
    return rows


def _accuracy_line(report) -> str:
    fp = [m for m in report.models if m.kind == "fp" and m.scores]
    binary = [m for m in report.models if m.kind != "fp" and m.scores]
    if not (fp and binary):
        return ""
    best = max(binary, key=lambda m: m.scores["top1"])
    delta = best.scores["top1"] - fp[0].scores["top1"]
    size = fp[0].summary.model_bytes / max(best.summary.model_bytes, 1.0)
    return (f"<p>Full precision <b>{_pct(fp[0].scores['top1'])}</b> ({html.escape(fp[0].path.name)}) vs binary "
            f"<b>{_pct(best.scores['top1'])}</b> ({html.escape(best.path.name)}): {delta:+.2f} points, "
            f"{size:.1f}x smaller.</p>")


def _exports(report) -> str:
    rows = []
    for e in report.exports:
        v = e.get("verification") or {}
        rows.append([e.get("format", "?"), e.get("path", "?"), f"{(e.get('bytes') or 0) / 1000:,.1f}",
                     f"{v['max_abs_diff']:.2e}" if isinstance(v.get("max_abs_diff"), (int, float)) else "not verified",
                     v.get("samples", "–"), v.get("runtime", "–")])
    if not rows:
        return ""
    return "<h2>Exports</h2>" + _table(["format", "file", "size kB", "max |diff| vs PyTorch", "samples",
                                        "runtime"], rows)


def render_html(report) -> str:
    """The page for a Report."""
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>bestcompress report</title>",
             f"<style>{STYLE}</style></head><body><h1>bestcompress report</h1>"]
    if report.data_name:
        parts.append(f"<p class='note'>Accuracy and firing rates on: {html.escape(str(report.data_name))}</p>")
    for note in report.notes:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    if report.models:
        parts.append("<h2>Summary</h2>" + _accuracy_line(report))
        parts.append(_table(["model", "kind", "top-1", "size kB", "fp32 kB", "compression", "1-bit MACs",
                             "SOPs", "energy mJ"], summary_rows(report)))
    parts.append(_exports(report))
    if report.curves_png:
        names = ", ".join(f"{r.name} ({r.kind})" for r in report.runs)
        parts.append(f"<h2>Training curves</h2><p class='note'>Runs: {html.escape(names)}</p>")
        parts.append(_img(report.curves_png, "training curves"))
    for m in report.models:
        parts.append(f"<h2>Layers of {html.escape(m.path.name)}</h2>")
        parts.append(_img(m.layer_png, f"layers of {m.path.name}"))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)
