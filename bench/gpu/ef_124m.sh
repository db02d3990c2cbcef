#!/usr/bin/env bash
# GPU machine, one device call: error feedback at the 124M shape (issue 12's setting): compressed
# sync FedAvg, 2 clients, block 256, batch 16, local-steps 16, lr 5e-4 (the app's), rank 10,
# `ROUNDS` rounds (default 7), PCA/QRCP/CUR with and without `error-feedback = "ef"` beside dense.
# Two processes per seed run side by side on GPU 0 (perplexity per round does not depend on
# timing): dense + PCA, and QRCP + CUR. Each writes its JSON after every run, and every process is
# stopped after `LIMIT_S` (default 540) so that the merged table of what finished is printed
# inside one call; every run's JSON comes back.
#   bash bench/gpu/ef_124m.sh [SEEDS=0,1,2]
set -uo pipefail
source "$(dirname "$0")/env.sh"
seeds=${1:-0,1,2}; rounds=${ROUNDS:-7}; limit=${LIMIT_S:-540}
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -l 10 > "$OUT/smi-ef.csv" &
smi=$!
outs=(); pids=()
for s in ${seeds//,/ }; do
  for part in pca qrcp,cur; do
    tag=s$s-${part/,/-}; extra=()
    [ "$part" = pca ] || extra=(--no-dense)
    timeout "$limit" python3 bench/error_feedback.py --preset small --device cuda --clients 2 \
      --rounds "$rounds" --ranks 10 --seeds "$s" --methods "$part" "${extra[@]}" --block-size 256 \
      --batch-size 16 --local-steps 16 --lr 5e-4 --tokenizer "$PWD/.data/gpt2" \
      --data-dir "$PWD/.data/wikitext-2-raw" --out "$OUT/ef-$tag.json" > "$OUT/ef-$tag.log" 2>&1 &
    pids+=($!); outs+=("$OUT/ef-$tag.json")
  done
done
wait "${pids[@]}"; kill "$smi" 2>/dev/null
tail -n 12 "$OUT"/ef-s*.log
sort -n "$OUT/smi-ef.csv" | tail -1 | sed 's/^/peak GPU memory, utilization: /'
done_=(); for f in "${outs[@]}"; do [ -s "$f" ] && done_+=("$f"); done
python3 bench/error_feedback.py --merge "$(IFS=,; echo "${done_[*]}")" --out "$OUT/ef-124m.json"
