"""Build of the engine's compiled popcount kernels (bestcompress/engine/_bitkernels.c); metadata is in pyproject.toml.

Tool: a plain setuptools Extension over the CPython API (no NumPy headers, no pybind11): setuptools is already the
build backend, so the kernels add no build dependency, and `optional=True` keeps `pip install -e .` working
without a compiler (the engine then runs its NumPy fallback and says so). Sources: _bitkernels.c (the module),
bk_pack.c (packing, im2col, pooling), bk_fastpack.c (one-pass packers of spikes and few-plane inputs), bk_gemm.c
(popcount products), bk_amx.c and bk_amx_conv.c (int8 matrix units: linear layers, convolutions). The popcount
variants (AVX-512 VPOPCNTDQ, AVX2 nibble-table VPSHUFB, NEON CNT, scalar) and the AMX routes are compiled with
per-function target attributes and picked at run time by what the CPU reports, so even a portable build runs them;
-march=native adds the AVX-512 packing loops.
Floating point is never contracted (-ffp-contract=off), so results round exactly as documented. Set
BESTCOMPRESS_NO_NATIVE=1 for a portable build, BESTCOMPRESS_NO_EXT=1 to skip the extension.
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
NATIVE_FLAGS = ["-march=native"]


class OptionalNativeBuild(build_ext):
    """Compile with -march=native; retry portably when the compiler rejects it."""

    def build_extension(self, ext):
        portable = list(ext.extra_compile_args)
        if not os.environ.get("BESTCOMPRESS_NO_NATIVE"):
            ext.extra_compile_args = portable + NATIVE_FLAGS
            try:
                return super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: try the portable flags
                print(f"bestcompress: native build of {ext.name} failed ({exc}); retrying without -march=native")
        ext.extra_compile_args = portable
        return super().build_extension(ext)


extensions = []
if not os.environ.get("BESTCOMPRESS_NO_EXT"):
    extensions.append(Extension("bestcompress.engine._bitkernels",
                                [f"bestcompress/engine/{name}.c" for name in ("_bitkernels", "bk_pack", "bk_fastpack",
                                                                              "bk_gemm", "bk_amx", "bk_amx_conv")],
                                depends=["bestcompress/engine/bk.h", "bestcompress/engine/bk_amx.h"],
                                extra_compile_args=BASE_FLAGS, optional=True))

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalNativeBuild})
