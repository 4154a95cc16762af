"""Graph passes of our own on the FINN-ready graph (qonnx ModelWrapper in, ModelWrapper out).

`FactorConvWeights`: the TorchScript ONNX exporter folds a BatchNorm that follows a convolution into the
convolution (eval mode), so a 1-bit convolution reaches the graph with weights ±m_c (the sign matrix times the
BatchNorm's per-channel scale, times α_c) and a bias. Those weights are not BIPOLAR, so FINN makes no MVAU of
the lowered convolution. This pass splits such a Conv back into Conv(±1 signs, no bias) → Mul(m_c) → Add(bias):
the product is integer × binary again (a BIPOLAR weight, FINN's MVAU), the per-channel affine is a plain
elementwise op after it. Only the float rounding of the affine changes (m_c·Σ±x instead of Σ±m_c·x).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper


def per_channel_magnitude(w: np.ndarray) -> np.ndarray | None:
    """m_c when every weight of output channel c is ±m_c with m_c > 0 (else None)."""
    if w.ndim < 2 or w.size == 0 or not np.all(np.isfinite(w)):
        return None
    a = np.abs(w.reshape(w.shape[0], -1))
    m = a[:, 0]
    if np.any(m <= 0) or not np.all(a == m[:, None]):
        return None
    return m


class FactorConvWeights:
    """Conv(±m_c weights, bias) → Conv(±1) → Mul(m_c) → Add(bias); see the module docstring.

    Returns the model (changed in place); `self.factored` lists the Conv nodes it split.
    """

    def __init__(self) -> None:
        self.factored: list[str] = []

    def apply(self, model):
        graph = model.graph
        new_nodes = []
        for node in graph.node:
            new_nodes.append(node)
            if node.op_type != "Conv" or len(node.input) < 2:
                continue
            w = model.get_initializer(node.input[1])
            m = None if w is None else per_channel_magnitude(w)
            if m is None:
                continue
            bias = model.get_initializer(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) > 2 and node.input[2] and bias is None:
                continue  # a bias computed at run time: leave the node alone
            scaled = not np.all(m == 1.0)
            if not scaled and bias is None:
                continue
            out = node.output[0]
            out_shape = model.get_tensor_shape(out)
            if not out_shape:
                continue
            view = [1, w.shape[0]] + [1] * (len(out_shape) - 2)
            sign = np.where(w >= 0, 1.0, -1.0).astype(np.float32)
            sign_name = model.make_new_valueinfo_name()
            model.set_initializer(sign_name, sign)
            node.input[1] = sign_name
            del node.input[2:]
            tail = node.output[0] = self._tensor(model, out_shape)
            if scaled:
                mul_out = out if bias is None else self._tensor(model, out_shape)
                new_nodes.append(self._op(model, "Mul", tail, m.reshape(view).astype(np.float32), mul_out))
                tail = mul_out
            if bias is not None:
                new_nodes.append(self._op(model, "Add", tail, bias.reshape(view).astype(np.float32), out))
            self.factored.append(node.name)
        if self.factored:
            del graph.node[:]
            graph.node.extend(new_nodes)
        return model

    @staticmethod
    def _tensor(model, shape) -> str:
        vi = helper.make_tensor_value_info(model.make_new_valueinfo_name(), TensorProto.FLOAT, list(shape))
        model.graph.value_info.append(vi)
        return vi.name

    @staticmethod
    def _op(model, op: str, x: str, const: np.ndarray, out: str):
        name = model.make_new_valueinfo_name()
        model.set_initializer(name, const)
        return helper.make_node(op, [x, name], [out])
