#!/usr/bin/env bash
# Set up a virtual environment with the pinned dependencies, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
python -m pip install -q -e . --no-deps
ruff check src tests benchmarks
python -m pytest "$@"
