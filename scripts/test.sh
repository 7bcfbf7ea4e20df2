#!/usr/bin/env bash
# Set up the test environment (requirements-test.txt: the core, every extra and the test stack;
# and Chromium for the page test), then lint and run the whole test suite (offline, CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/install-browser.sh
. .venv/bin/activate
ruff check src tests benchmarks
python -m pytest -rs "$@"  # -rs: every skip prints its reason
