#!/usr/bin/env bash
# Installs bestcompress and everything its main job, tests and optional paths need into the active Python.
# torch==2.13.0 comes first (a CPU wheel on these machines): a plain `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP install -e ".[test,neurons,finn]"
# spikingjelly 2.0.0 declares torchvision/torchaudio (broken beside CPU torch) and mnist1d declares nothing it
# needs here: install both without dependencies, then the few they import.
$PIP install --no-deps spikingjelly==2.0.0 mnist1d==0.0.2.post1
$PIP install loguru tqdm matplotlib scipy packaging requests
# FINN+ pins brevitas 0.13.0 / onnx 1.21 / an old setuptools, which would drag in another torch: --no-deps.
$PIP install --no-deps finn-plus==1.6.1
$PIP install "scipy>=1.17,<1.18" pydantic bitstring psutil termcolor
