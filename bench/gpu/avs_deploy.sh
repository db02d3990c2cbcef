#!/usr/bin/env bash
# GPU machine, one device call: async vs sync in real deployment (scripts/local-deployment.sh:
# TLS SuperLink, 4 authenticated SuperNodes sharing GPU 0, forked ClientApps), GPT-2 124M
# shape, speeds 1,1,2,4, PCA rank 10, the app's defaults otherwise. Runs one after another.
#   bash bench/gpu/avs_deploy.sh REGIME SEEDS SPECS [BUDGET_S=150]
# env: CALL_S (seconds the whole call may take, default 545), EVAL_EVERY (async: evaluate every N
# updates, default 0, the app's auto: every 4 updates here; sync evaluates every round), TASK_S
# (`task-s`: a task lasts factor x TASK_S seconds, compute included; default 0 = the sleep is
# (factor-1) x the measured compute, which follows how busy the shared GPU was).
# REGIME: a = local-steps 16, b = local-steps 64. SPECS: "sync,<async spec>" (async_vs_sync.py).
# Each run's events.jsonl and summary.json come back in runs-<regime>.tgz. Carry .whl, .data.
# The runs of a seed share one deployment (--share-deployment: start-up and the node workers'
# warm-up once per seed, the order reversed every other seed). A regime-B pair takes about
# 150 + 150 s of budget, a sync round that ends past it (~37 s) and ~60-90 s of start-up and
# warm-ups: give CALL_S=590 and one seed per call there; merge the seeds' folders here with
# `bench/async_vs_sync.py ... --reuse --out DIR`.
set -uo pipefail
source "$(dirname "$0")/env.sh"
regime=${1:-a}; seeds=${2:-11}; specs=${3:-sync,asgd}; budget=${4:-150}
case "$regime" in a) steps=16 ;; b) steps=64 ;; *) echo "regime a or b" >&2; exit 2 ;; esac
sync=$(echo "$specs" | tr ',' '\n' | grep '^sync' | paste -sd, -)
rules=$(echo "$specs" | tr ',' '\n' | grep -v '^sync' | paste -sd, -)
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -l 5 > "$OUT/smi-$regime.csv" &
timeout "${CALL_S:-545}" python3 bench/async_vs_sync.py --backend deployment --gpus 0 --preset small --device cuda \
  --tokenizer "$PWD/.data/gpt2" --data-dir "$PWD/.data/wikitext-2-raw" --seeds "$seeds" \
  --time-budget-s "$budget" --timeout-s $((budget + 150)) --set "local-steps=$steps task-s=${TASK_S:-0}" \
  --eval-every "${EVAL_EVERY:-0}" --share-deployment --sync "$sync" --rules "$rules" --out "$OUT/dep-$regime" > "$OUT/dep-$regime.log" 2>&1
echo "exit $?"
grep -v '^\[async_vs_sync\] \$' "$OUT/dep-$regime.log" | tail -25
cd "$OUT" && tar czf "runs-$regime.tgz" --exclude='*.png' --exclude=model --exclude='*.pt' \
  dep-$regime/runs dep-$regime/results.json dep-$regime/table.md dep-$regime/work/*/output.log 2>/dev/null
ls -la "$OUT"
