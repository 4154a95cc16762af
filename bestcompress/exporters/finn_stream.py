"""SplitStreamScale: one copy of a quantized stream's power-of-two Mul per reader, before FINN's Streamline.

A coupled stream quantized by `reversible.stream_bits` (nn/stream_quant.py) reaches the FINN-ready graph as
MultiThreshold(z, out_dtype INTn) → Mul(2^e), and that Mul's output is read by several nodes (the q, k and v
MatMuls, the next coupling's Mul/Add, a head). FINN's MoveScalarMulPastMatMul only moves a Mul that has a single
consumer, so the MatMuls would keep reading the scaled FLOAT32 tensor. Giving each reader its own copy of the Mul
(the same scalar on the same INTn tensor: the values are unchanged) lets Streamline move each copy past its
MatMul, which then reads the INTn tensor with BIPOLAR weights (an MVAU).
"""
from __future__ import annotations

import numpy as np
from onnx import helper


def threshold_out_dtype(node) -> str | None:
    """A MultiThreshold's out_dtype ('BINARY' for a neuron's spikes, 'INTn' for a quantized stream); None for
    another node or when the attribute is absent."""
    if node is None or node.op_type != "MultiThreshold":
        return None
    return next((a.s.decode() for a in node.attribute if a.name == "out_dtype"), None)


def _int_threshold(model, name: str) -> bool:
    return (threshold_out_dtype(model.find_producer(name)) or "").startswith("INT")


class SplitStreamScale:
    """Duplicate every scalar Mul that reads an INTn MultiThreshold and has several readers (module docstring)."""

    label = "SplitStreamScale"

    def apply(self, model):
        graph = model.graph
        split = 0
        for node in list(graph.node):
            if node.op_type != "Mul" or len(node.input) != 2 or not _int_threshold(model, node.input[0]):
                continue
            scale = model.get_initializer(node.input[1])
            if scale is None or np.asarray(scale).size != 1:
                continue
            readers = model.find_consumers(node.output[0]) or []
            if len(readers) < 2 or node.output[0] in [o.name for o in graph.output]:
                continue
            shape = model.get_tensor_shape(node.output[0])
            dtype = model.get_tensor_datatype(node.output[0])
            at = list(graph.node).index(node)
            for i, reader in enumerate(readers[1:], start=1):
                out = f"{node.output[0]}_r{i}"
                copy = helper.make_node("Mul", [node.input[0], node.input[1]], [out], name=f"{node.name}_r{i}")
                graph.node.insert(at + i, copy)
                model.set_tensor_shape(out, shape)
                model.set_tensor_datatype(out, dtype)
                for j, name in enumerate(reader.input):
                    if name == node.output[0]:
                        reader.input[j] = out
                split += 1
        return model
