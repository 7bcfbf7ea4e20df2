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
if [ "$set_name" = test ]; then
    # llama-cpp-python (the tests' llama.cpp) builds llama.cpp from its sdist: the library only
    # (no multimodal library; tests, tools, examples and server are off in a subproject
    # build), on every core. pip keeps the built wheel in its cache: later installs are instant.
    export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF}"
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r "$requirements"
python -m pip install -q -e . --no-deps
