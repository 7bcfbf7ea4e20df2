#!/usr/bin/env bash
# Create .venv with folio and its pinned dependencies (idempotent).
#   bash scripts/setup.sh        the core: prepare, train, sample, plot (requirements.txt)
#   bash scripts/setup.sh test   the core, every extra and the test stack (requirements-test.txt)
# FOLIO_SETUP=test does the same as the argument.
set -euo pipefail
cd "$(dirname "$0")/.."
set_name="${1:-${FOLIO_SETUP:-core}}"
case "$set_name" in
    core) requirements=requirements.txt ;;
    test) requirements=requirements-test.txt ;;
    *) echo "setup: unknown set '$set_name' (core or test)" >&2; exit 2 ;;
esac
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r "$requirements"
python -m pip install -q -e . --no-deps
