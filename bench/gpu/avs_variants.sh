#!/usr/bin/env bash
# GPU machine, one device call: two more async rules for the avs_forked.sh configuration
# (deployment, forked ClientApps, 4 SuperNodes sharing GPU 0, GPT-2 124M shape, speeds 1,1,2,4),
# run straight through scripts/local-deployment.sh; each run's events.jsonl and summary.json
# are copied to $OUT/<name>/ (compare with avs_forked.sh's sync run). Carry .whl and .data.
#   bash bench/gpu/avs_variants.sh [BUDGET_S=180]
set -uo pipefail
source "$(dirname "$0")/env.sh"
budget=${1:-180}
base='model-preset="small" block-size=256 max-train-blocks=256 batch-size=16 local-steps=16 lr=0.0005 eval-max-blocks=64 eval-batch-size=32 device="cuda" compressor="pca" rank=10 client-speeds="1,1,2,4" min-nodes=4 save-model=false seed=42 mode="async" selection="same" max-updates=1000000 staleness="polynomial" staleness-a=0.5 eval-every=6'
base="$base tokenizer=\"$PWD/.data/gpt2\" data-dir=\"$PWD/.data/wikitext-2-raw\" time-budget-s=$budget results-dir=\"/tmp/avsv\""
for spec in 'asgd-lr0.25|rule="asgd" server-lr=0.25' 'fedbuff2-lr0.5|rule="fedbuff" buffer-size=2 server-lr=0.5'; do
  name=${spec%%|*}; cfg=${spec#*|}
  echo "== $name: $cfg"
  timeout $((budget + 90)) scripts/local-deployment.sh 4 --gpus 0 --run-config "$base $cfg run-name=\"$name\"" \
    > "$OUT/$name.log" 2>&1; echo "exit $?"
  mkdir -p "$OUT/$name"; cp /tmp/avsv/$name/events.jsonl /tmp/avsv/$name/summary.json "$OUT/$name/" 2>/dev/null
  grep "asyncfl: eval" "$OUT/$name.log" | tail -40 | awk '{print $6, $7, $9}' | tr '\n' ';'; echo
done
