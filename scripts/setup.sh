#!/usr/bin/env bash
# Installs bestcompress and everything its main job, tests and optional paths need into the active Python.
# torch==2.13.0 comes first (a CPU wheel on these machines): a plain `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
# triton: the Triton LIF kernels (nn/lif_triton.py, for CUDA tensors) are tested in its CPU interpreter. Its wheel
# needs no other package; a CUDA torch brings its own triton, which is kept. Without a wheel for this Python or
# platform those tests skip.
python -c "import triton" 2>/dev/null || $PIP install --no-deps triton==3.9.0 \
  || echo "triton not installed: the Triton kernel tests will skip"
$PIP install -e ".[test,neurons,finn]"
# spikingjelly 2.0.0 declares torchvision/torchaudio (broken beside CPU torch) and mnist1d declares nothing it
# needs here: install both without dependencies, then the few they import.
$PIP install --no-deps spikingjelly==2.0.0 mnist1d==0.0.2.post1
$PIP install loguru tqdm matplotlib scipy packaging requests
# norse 1.1.0 (an sdist, pure Python) declares torchvision, which breaks beside CPU torch: --no-deps, then what its
# import needs (nir reads files with h5py; norse 1.1.0 uses nirtorch 1.x's extract_nir_graph).
$PIP install --no-deps norse==1.1.0 nir==1.0.4 nirtorch==1.0 h5py==3.16.0
# FINN+ pins brevitas 0.13.0 / onnx 1.21 / an old setuptools, which would drag in another torch: --no-deps.
$PIP install --no-deps finn-plus==1.6.1
$PIP install "scipy>=1.17,<1.18" pydantic bitstring psutil termcolor
