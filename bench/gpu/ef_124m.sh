#!/usr/bin/env bash
# GPU machine, one device call: error feedback at the 124M shape (issue 12's setting): compressed
# sync FedAvg, 2 clients, block 256, batch 16, local-steps 16, lr 5e-4 (the app's), rank 10,
# `ROUNDS` rounds (default 7), PCA/QRCP/CUR with and without `error-feedback = "ef"` beside dense.
# The seeds run side by side, one process each, on GPU 0 (perplexity per round does not depend on
# timing); the merged table is printed at the end and every run's JSON comes back.
#   bash bench/gpu/ef_124m.sh [SEEDS=0,1,2]
set -uo pipefail
source "$(dirname "$0")/env.sh"
seeds=${1:-0,1,2}; rounds=${ROUNDS:-7}
outs=()
for s in ${seeds//,/ }; do
  python3 bench/error_feedback.py --preset small --device cuda --clients 2 --rounds "$rounds" \
    --ranks 10 --seeds "$s" --block-size 256 --batch-size 16 --local-steps 16 --lr 5e-4 \
    --tokenizer "$PWD/.data/gpt2" --data-dir "$PWD/.data/wikitext-2-raw" \
    --out "$OUT/ef-s$s.json" > "$OUT/ef-s$s.log" 2>&1 &
  outs+=("$OUT/ef-s$s.json")
done
wait
tail -n 12 "$OUT"/ef-s*.log
python3 bench/error_feedback.py --merge "$(IFS=,; echo "${outs[*]}")" --out "$OUT/ef-124m.json"
