#!/usr/bin/env bash
# GPU measurements, part 2 (one device call): the deployment topology on the GPU machine --
# per-update overhead (tiny preset, then 4 SuperNodes sharing GPU 0 with the GPT-2 124M shape),
# one task at a time vs prefetch, update-log vs fp16 vs fp32 downlink, client tokens/s and
# GPU memory per process. Same carry as part 1 (.whl, .data).
set -uo pipefail
source "$(dirname "$0")/env.sh"
echo "== deployment overhead, tiny preset, CPU clients, 2 SuperNodes"
timeout 170 python3 bench/deployment_overhead.py --data .data --nodes 2 --updates 12 \
  --profiles tuned,prefetch --repeats 2 --out "$OUT/overhead_tiny.json" > "$OUT/overhead_tiny.log" 2>&1
grep -A12 "^| profile" "$OUT/overhead_tiny.log" | tail -24
echo "== deployment overhead, GPT-2 124M shape, 4 SuperNodes on GPU 0"
# the update-log downlink first: it is the deployment default for asgd and the figure still missing
timeout 330 python3 bench/deployment_overhead.py --data .data --nodes 4 --updates 16 --preset small \
  --device cuda --gpus 0 --profiles prefetch-log,prefetch-fp16,prefetch --run-config 'rule="asgd"' \
  --no-fresh --out "$OUT/overhead_124m.json" > "$OUT/overhead_124m.log" 2>&1
grep -A12 "^| profile" "$OUT/overhead_124m.log" | tail -24
tail -5 "$OUT/overhead_124m.log"
