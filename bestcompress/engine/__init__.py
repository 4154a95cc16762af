"""The 1-bit inference engine: packed sign bits and popcount products for binary spiking models on CPU.

    engine = bestcompress.engine.load("model.bcz")
    logits = engine(batch)          # [B, *input_shape] -> [B, classes]
    engine.memory()                 # packed weights + activations, in bytes
    bestcompress.engine.verify(engine)   # spike-exact with the PyTorch binary model?

Every binary Conv1d/Conv2d/Linear runs as popcounts over bit-packed inputs when those are spikes or sums of
spikes (and ½-couplings), the spike×spike attention matmuls likewise; everything else is the model's own torch
code. Kernels: the compiled extension built at install, its popcount variant picked at run time for the CPU
(AVX-512 VPOPCNTDQ, AVX2 nibble-table VPSHUFB, ARM NEON CNT, scalar), linear layers (inputs of up to 8 bit planes)
on the int8 matrix units (x86 AMX) where the CPU has them; without a compiler, a NumPy fallback. `use_kernels(isa=...,
int8=...)` or BESTCOMPRESS_ENGINE_ISA / BESTCOMPRESS_ENGINE_INT8 (off, multi, all) choose.
"""
from .kernels import backend, backend_description, compiled_available, use_backend, use_kernels
from .runtime import Engine, from_model, load
from .verify import verify

__all__ = ["Engine", "backend", "backend_description", "compiled_available", "from_model", "load", "use_backend",
           "use_kernels", "verify"]
