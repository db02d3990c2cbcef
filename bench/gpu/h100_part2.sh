#!/usr/bin/env bash
# GPU measurements, part 2 (one device call): the deployment topology (4 SuperNodes sharing
# one GPU, GPT-2 124M shape): async vs sync, client tokens/s, per-update overhead, GPU memory per SuperNode. Same carry as part 1 (.whl, .data).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 TOKENIZERS_PARALLELISM=false
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
( while sleep 5; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; done ) > "$OUT/gpu_mem.log" 2>&1 &
MON=$!
echo "== async vs sync, deployment, 4 SuperNodes on GPU 0, GPT-2 124M shape"
python3 bench/async_vs_sync.py --deployment --preset small --device cuda --gpus 0 \
  --tokenizer .data/gpt2 --data-dir .data/wikitext-2-raw --calib-rounds 6 --time-budget-s 90 --rules asgd \
  --out "$OUT/avs" 2>&1 | tail -30 | tee "$OUT/avs.txt"
kill $MON
sort -u "$OUT/gpu_mem.log" | tail -20
