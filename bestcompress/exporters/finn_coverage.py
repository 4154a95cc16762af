"""The FINN coverage report: per node, the hardware layer it became or why not; 1-bit MACs in hardware layers;
a starting folding configuration; FINN's cycle and resource estimates (those that need no vendor tool).

A 1-bit MAC is one multiply-accumulate of a matrix layer (MatMul, Conv, MVAU, VVAU) whose weight operand is
BIPOLAR or BINARY (a 1-bit layer) or whose both operands are spikes (attention's spike×spike products).
`binary_mac_fraction_in_hw` is the share of those MACs that sit in MVAU/VVAU hardware layers.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

HW_DOMAIN = "finn.custom_op.fpgadataflow"
MATRIX_LAYERS = ("MVAU", "VVAU", "MatrixVectorActivation", "VectorVectorActivation")
ONE_BIT = ("BIPOLAR", "BINARY")
FPGA_PART = "xczu7ev-ffvc1156-2-e"  # ZCU104: the part FINN's examples estimate for


def _dtype(model, tensor: str) -> str:
    try:
        return model.get_tensor_datatype(tensor).name
    except Exception:
        return "?"


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper
            return helper.get_attribute_value(a)
    return default


def node_macs(model, node) -> tuple[int, bool]:
    """(MACs of one matrix node, whether they are 1-bit MACs); (0, False) for other nodes."""
    op = node.op_type
    if op in ("MVAU", "MatrixVectorActivation"):
        vectors = int(np.prod(_attr(node, "numInputVectors", [1])))
        macs = vectors * int(_attr(node, "MW")) * int(_attr(node, "MH"))
        dts = (_attr(node, "inputDataType", b"").decode(), _attr(node, "weightDataType", b"").decode())
        return macs, dts[1] in ONE_BIT or all(d in ONE_BIT for d in dts)
    if op in ("VVAU", "VectorVectorActivation"):
        k = _attr(node, "Kernel", [1, 1])
        dim = _attr(node, "Dim", [1, 1])
        macs = int(_attr(node, "Channels")) * int(np.prod(k)) * int(np.prod(dim))
        return macs, _attr(node, "weightDataType", b"").decode() in ONE_BIT
    if op not in ("MatMul", "Conv", "Gemm") or len(node.input) < 2:
        return 0, False
    out = model.get_tensor_shape(node.output[0])
    w = model.get_tensor_shape(node.input[1])
    if not out or not w:
        return 0, False
    if op == "Conv":
        macs = int(np.prod(out)) * int(np.prod(w[1:]))
    elif op == "Gemm":
        macs = int(np.prod(out)) * int(w[1] if _attr(node, "transB", 0) else w[0])
    else:
        macs = int(np.prod(out)) * int(w[-2] if len(w) > 1 else w[0])
    dts = (_dtype(model, node.input[0]), _dtype(model, node.input[1]))
    return macs, dts[1] in ONE_BIT or all(d in ONE_BIT for d in dts)


def why_not(model, node, inits: set[str]) -> str:
    """Why a node stayed a plain (software) ONNX node of the FINN-ready graph."""
    op = node.op_type
    idt = _dtype(model, node.input[0]) if node.input else "?"
    if op in ("MatMul", "Gemm", "Conv"):
        w = node.input[1] if len(node.input) > 1 else None
        wdt = _dtype(model, w) if w else "?"
        if wdt not in ONE_BIT and w in inits:
            return "full-precision weights (a layer the recipe keeps in fp32: first layer or head)"
        if idt == "FLOAT32":
            return f"its input is a FLOAT32 stream, not spikes (weights {wdt})"
        return f"FINN found no MVAU for {idt} × {wdt} here"
    if op == "Im2Col":
        return f"sliding window over a {idt} stream (the full-precision first convolution reads the raw input)"
    if op in ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        return ("layout op (NCHW↔NHWC around a lowered convolution, head split, 1-D convolution viewed as 2-D) "
                "that FINN's streamlining could not absorb")
    if op in ("ReduceMean", "ReduceSum", "GlobalAveragePool"):
        return "mean over tokens of a float stream (FINN's pooling layers need an integer stream)"
    if op == "MultiThreshold":
        return f"spike threshold on a {idt} membrane that no Thresholding layer took"
    if op in ("Mul", "Add", "Sub", "Div"):
        return f"float elementwise op on a {idt} stream that FINN's elementwise layers did not take"
    if op == "BatchNormalization":
        return "BatchNorm on a float stream that could not be folded"
    return f"no FINN hardware layer for {op} here"


def estimates(model, node) -> dict:
    """FINN's cycle and resource estimates of one hardware node (what it can estimate without vendor tools)."""
    from finn.util.basic import getHWCustomOp

    out = {}
    try:
        inst = getHWCustomOp(node)
    except Exception:
        return out
    try:
        out["cycles"] = int(inst.get_exp_cycles())
    except Exception:
        pass
    try:
        res = inst.node_res_estimation(FPGA_PART)
        out["resources"] = {k: (float(v) if isinstance(v, (int, float, np.number)) else v) for k, v in res.items()}
    except Exception:
        pass
    return out


def folding_config(model) -> dict:
    """A starting folding configuration (FINN's folding_config.json): every layer fully folded (PE = SIMD = 1),
    the setting a first bitstream fits with; raise PE/SIMD where the cycle estimates say a layer is slow."""
    cfg: dict = {"Defaults": {}}
    for node in model.graph.node:
        if not node.domain.startswith(HW_DOMAIN):
            continue
        entry = {}
        names = {a.name for a in node.attribute}
        for key in ("PE", "SIMD", "parallel_window"):
            if key in names:
                entry[key] = 0 if key == "parallel_window" else 1
        if "ram_style" in names:
            entry["ram_style"] = "auto"
        cfg[node.name] = entry
    return cfg


def coverage(model, with_estimates: bool = True) -> dict:
    """Per-node report of a FINN model and its totals (see the module docstring)."""
    inits = {i.name for i in model.graph.initializer}
    rows = []
    hw_macs = sw_macs = 0
    cycles = []
    for node in model.graph.node:
        hw = node.domain.startswith(HW_DOMAIN)
        macs, one_bit = node_macs(model, node)
        row = {"node": node.name, "op_type": node.op_type, "hw": hw, "layer": node.op_type if hw else None,
               "reason": None if hw else why_not(model, node, inits), "macs": macs, "one_bit": one_bit}
        if one_bit:
            if hw and node.op_type in MATRIX_LAYERS:
                hw_macs += macs
            else:
                sw_macs += macs
        if hw and with_estimates:
            row.update(estimates(model, node))
            if "cycles" in row:
                cycles.append(row["cycles"])
        rows.append(row)
    n_hw = sum(r["hw"] for r in rows)
    total_bits = hw_macs + sw_macs
    mvau = sum(r["hw"] and r["op_type"] in MATRIX_LAYERS and r["one_bit"] for r in rows)
    unmapped = sum(not r["hw"] and r["one_bit"] for r in rows)
    resources: Counter = Counter()
    for r in rows:
        for k, v in (r.get("resources") or {}).items():
            if isinstance(v, (int, float)) and "efficiency" not in k:
                resources[k] += v
    totals = {"nodes": len(rows), "hw": n_hw, "not_mapped": len(rows) - n_hw,
              "hw_fraction": n_hw / len(rows) if rows else 0.0,
              "binary_macs": total_bits, "binary_macs_in_hw": hw_macs,
              "binary_mac_fraction_in_hw": hw_macs / total_bits if total_bits else 0.0,
              "binary_weight_layers": {"mvau": mvau, "not_mapped": unmapped},
              "by_layer": dict(Counter(r["layer"] for r in rows if r["hw"]).most_common()),
              "by_reason": dict(Counter(r["reason"] for r in rows if not r["hw"]).most_common())}
    if cycles:
        totals["estimates"] = {"fpga_part": FPGA_PART, "slowest_layer_cycles": max(cycles),
                               "resources": {k: round(v, 1) for k, v in resources.items()},
                               "note": ("FINN's analytical estimates at PE = SIMD = 1 for the generic (not yet HLS/RTL-"
                                        "specialized) layers, which estimate memories but count no LUTs; no "
                                        "synthesis was run")}
    return {"nodes": rows, "totals": totals,
            "binary_mac_fraction_in_hw": totals["binary_mac_fraction_in_hw"],
            "nodes_total": len(rows), "nodes_hw": n_hw}


def format_report(report: dict) -> str:
    """The coverage report as a readable text table."""
    lines = [f"{'node':<34} {'op':<26} {'FINN hardware layer / why not'}", "-" * 110]
    for r in report["nodes"]:
        what = r["layer"] if r["hw"] else "not mapped: " + r["reason"]
        if r.get("one_bit"):
            what += f"  [{r['macs']} 1-bit MACs]"
        if r.get("cycles") is not None:
            what += f"  ({r['cycles']} cycles)"
        lines.append(f"{r['node']:<34} {r['op_type']:<26} {what}")
    t = report["totals"]
    w = t["binary_weight_layers"]
    lines += ["-" * 110,
              f"total nodes {t['nodes']}: {t['hw']} hardware layers ({100 * t['hw_fraction']:.1f} %), "
              f"{t['not_mapped']} not mapped",
              f"1-bit MACs in hardware layers: {t['binary_macs_in_hw']} of {t['binary_macs']} "
              f"({100 * t['binary_mac_fraction_in_hw']:.1f} %); 1-bit matrix layers on MVAU/VVAU: {w['mvau']} of "
              f"{w['mvau'] + w['not_mapped']}"]
    est = t.get("estimates")
    if est:
        lines.append(f"estimates ({est['fpga_part']}, PE = SIMD = 1): slowest layer {est['slowest_layer_cycles']} "
                     f"cycles; resources {est['resources']}")
    for layer, n in t["by_layer"].items():
        lines.append(f"  {n:>5} × {layer}")
    for reason, n in t["by_reason"].items():
        lines.append(f"  {n:>5} × not mapped: {reason}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
