#!/usr/bin/env bash
# One-shot GPU check of the Triton LIF kernels (nn/lif_triton.py; issue 11, speed item 1), for a machine with a CUDA
# GPU; about 2-4 minutes. From the repository root:
#
#     bash benchmarks/gpu_check.sh [OUTDIR]        # OUTDIR: default $OUT, else /tmp/gpu_check
#
# It needs a python3 (or $PYTHON) with a CUDA torch and triton, and downloads nothing (the lent GPU machines reach
# no registry; their image has torch, triton, numpy, pyyaml, tqdm, pytest). The lif_gpu row also needs spikingjelly
# 2.0.0 and loguru: when they do not import, wheels in .whl/ are installed into a scratch folder. Make them here,
# where pip reaches the registry, and carry .whl (ignored through .git/info/exclude):
#
#     pip download --no-deps --only-binary=:all: -d .whl spikingjelly==2.0.0 loguru==0.7.3
#
# Steps: what the machine has; lif_backend('cuda'); tests/nn/test_lif_triton.py (its CUDA tests run the real dispatch
# and compare with the CPU; the interpreter tests run too); bench_speed.py --only lif_gpu. Writes to OUTDIR:
# gpu_check.log (everything), lif_gpu.json (the row) and speed.json (this copy's benchmarks/results/speed.json with
# the row merged: copy it back only if the repository's speed.json has not changed since). Exit status: non-zero if
# a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-/tmp/gpu_check}}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/gpu_check_ext} BESTCOMPRESS_LIF=auto
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}
: >"$LOG"
step machine 60 bash -c "nvidia-smi -L; $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \
torch.__version__, torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
if ! $PY -c "import spikingjelly.activation_based.neuron, loguru" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  step wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site \
    .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
step backend 120 $PY -c "from bestcompress.nn.lif_kernel import lif_backend; b = lif_backend('cuda'); print(b)
raise SystemExit(b[0] != 'triton')"
step tests 240 $PY -m pytest -q -rs -p no:cacheprovider tests/nn/test_lif_triton.py
before=$(date -r benchmarks/results/speed.json +%s%N 2>/dev/null || echo 0)
step lif_gpu 120 $PY benchmarks/bench_speed.py --only lif_gpu --repeats 20
$PY - "$OUTDIR" "$before" <<'EOF' 2>&1 | tee -a "$LOG" || status=1
import json, pathlib, shutil, sys
src = pathlib.Path("benchmarks/results/speed.json")
fresh = src.exists() and src.stat().st_mtime_ns > int(sys.argv[2])  # written by this run, not an older row
row = json.loads(src.read_text()).get("details", {}).get("lif_gpu") if fresh else None
if row is None or "skipped" in row:
    raise SystemExit("no lif_gpu row measured in this run")
else:
    pathlib.Path(sys.argv[1], "lif_gpu.json").write_text(json.dumps(row, indent=2) + "\n")
    shutil.copy(src, pathlib.Path(sys.argv[1], "speed.json"))
    print(f"lif_gpu {row['lif_gpu']:.3f} ({row['backend']}, {row['device']}) -> {sys.argv[1]}")
EOF
echo "gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo a step FAILED, see $LOG)" | tee -a "$LOG"
exit $status
