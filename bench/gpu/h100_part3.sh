#!/usr/bin/env bash
# GPU measurements, part 3 (one device call): async vs sync in deployment mode, 4 SuperNodes
# sharing GPU 0, GPT-2 124M shape. Same carry as part 1 (.whl, .data).
set -uo pipefail
source "$(dirname "$0")/env.sh"
echo "== async vs sync, deployment, 4 SuperNodes on GPU 0, GPT-2 124M shape"
timeout 560 python3 bench/async_vs_sync.py --deployment --preset small --device cuda --gpus 0 \
  --tokenizer "$PWD/.data/gpt2" --data-dir "$PWD/.data/wikitext-2-raw" --calib-rounds 6 --time-budget-s 90 --rules asgd \
  --out "$OUT/avs" 2>&1 | tail -30 | tee "$OUT/avs.txt"
