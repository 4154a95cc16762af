#!/usr/bin/env bash
# From a fresh clone: create .venv, install everything, run the main job end to end on scikit-learn's digits:
# train the full-precision teacher, binarize (BESTformer), distill (CIE), export, summarize.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
bash scripts/setup.sh
python examples/digits_end_to_end.py "$@"
