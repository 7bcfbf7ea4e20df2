#!/usr/bin/env bash
# The whole journey on a laptop CPU: prepare tiny Shakespeare, train a small character-level
# GPT for a few minutes, sample from it and draw its loss curve.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # the core only: no extra is needed here
. .venv/bin/activate
folio prepare shakespeare_char
# run again, it goes on from the saved run (nothing is overwritten; done if it is complete)
resume=()
if [ -f out-shakespeare-char/run.json ]; then resume=(--init_from=resume); fi
folio train shakespeare_char_cpu --device=cpu ${resume[@]+"${resume[@]}"}
folio sample --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=2 --max_new_tokens=300
folio plot out-shakespeare-char
echo "loss curve: out-shakespeare-char/loss.png"
