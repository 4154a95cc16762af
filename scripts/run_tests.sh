#!/usr/bin/env bash
# From a fresh clone: create .venv, install everything (scripts/setup.sh), run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
bash scripts/setup.sh
python -m pytest -q "$@"
