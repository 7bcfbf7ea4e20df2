#!/usr/bin/env bash
# Set up the test environment (requirements-test.txt: the core, every extra and the test stack),
# then lint and run the tests (offline, CPU):
#   scripts/test.sh          both tiers: every test, Chromium for the page test (minutes)
#   scripts/test.sh --fast   the fast tier only: pytest -m "not slow" (in-process, ~1 minute)
# Other arguments go to pytest, e.g. `scripts/test.sh --fast tests/test_sample.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
args=()
for arg in "$@"; do
    if [ "$arg" = --fast ]; then fast=1; else args+=("$arg"); fi
done
bash scripts/setup.sh test
[ "$fast" = 1 ] || bash scripts/install-browser.sh  # the page test is in the slow tier
. .venv/bin/activate
ruff check src tests benchmarks
[ "$fast" = 0 ] || args=(-m "not slow" ${args[@]+"${args[@]}"})
python -m pytest -rs ${args[@]+"${args[@]}"}  # -rs: every skip prints its reason
