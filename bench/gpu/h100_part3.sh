#!/usr/bin/env bash
# GPU measurements, part 3 (one device call): async vs sync in deployment mode, 4 SuperNodes
# sharing GPU 0, GPT-2 124M shape. Same carry as part 1 (.whl, .data).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
python3 -m compileall -q -j 0 /tmp/site > /dev/null
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
echo "== async vs sync, deployment, 4 SuperNodes on GPU 0, GPT-2 124M shape"
timeout 560 python3 bench/async_vs_sync.py --deployment --preset small --device cuda --gpus 0 \
  --tokenizer .data/gpt2 --data-dir .data/wikitext-2-raw --calib-rounds 6 --time-budget-s 90 --rules asgd \
  --out "$OUT/avs" 2>&1 | tail -30 | tee "$OUT/avs.txt"
