#!/usr/bin/env bash
# The whole journey on a laptop CPU: prepare tiny Shakespeare, train the best character-level
# GPT this machine can train in two minutes, sample from it and draw its loss curve.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # the core only: no extra is needed here
. .venv/bin/activate
folio prepare shakespeare_char
# run again, it goes on from the saved run (nothing is overwritten; done if its time is up)
resume=()
if [ -f out-quickstart/run.json ]; then resume=(--init_from=resume); fi
folio train --time=2m --device=cpu --out_dir=out-quickstart ${resume[@]+"${resume[@]}"}
folio sample --out_dir=out-quickstart --start="ROMEO:" --num_samples=2 --max_new_tokens=300
folio plot out-quickstart
echo "loss curve: out-quickstart/loss.png"
