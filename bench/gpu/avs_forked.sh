#!/usr/bin/env bash
# GPU machine, one device call: async (asgd) vs sync in deployment mode with the deployment
# defaults of the fourth session (asyncfl-superexec: ClientApp processes forked warm; prefetch,
# packed update-log downlink), 4 SuperNodes sharing GPU 0, GPT-2 124M shape. The target ppl is
# the one the third session's 6-round sync calibration gave for this exact configuration and
# seed (1742.3, bench/README.md), so the whole call goes to two longer runs, both for the
# whole budget (time to target read from the event log, ppl compared at equal wall-clock):
#   bash bench/gpu/avs_forked.sh [BUDGET_S=200] [TARGET_PPL=1742.3]
# Carry .whl and .data.
set -uo pipefail
source "$(dirname "$0")/env.sh"
budget=${1:-200}; target=${2:-1742.3}
echo "== async vs sync, deployment (forked ClientApps), 4 SuperNodes on GPU 0, GPT-2 124M shape, budget ${budget} s"
timeout 575 python3 bench/async_vs_sync.py --deployment --preset small --device cuda --gpus 0 \
  --tokenizer "$PWD/.data/gpt2" --data-dir "$PWD/.data/wikitext-2-raw" --target-ppl "$target" \
  --time-budget-s "$budget" --timeout-s $((budget + 60)) --equal-budget --rules asgd \
  --out "$OUT/avs" 2>&1 | tail -30 | tee "$OUT/avs.txt"
