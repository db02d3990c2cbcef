#!/usr/bin/env bash
# GPU measurements, part 2 (one device call): the deployment topology on the GPU machine --
# per-update overhead with the tiny preset (1 SuperNode, asgd + PCA: unpacked vs packed
# arrays), then 4 SuperNodes sharing GPU 0 with the GPT-2 124M shape (update-log downlink
# packed and not, full fp32 weights packed), client tokens/s and GPU memory per process.
# Same carry as part 1 (.whl, .data).
set -uo pipefail
source "$(dirname "$0")/env.sh"
echo "== deployment overhead, tiny preset, CPU client, 1 SuperNode, asgd + PCA"
timeout 200 python3 bench/deployment_overhead.py --data .data --nodes 1 --updates 12 \
  --profiles prefetch-log,packed-log --run-config 'rule="asgd" compressor="pca"' --repeats 3 \
  --out "$OUT/overhead_tiny.json" > "$OUT/overhead_tiny.log" 2>&1
grep -A6 "^| profile" "$OUT/overhead_tiny.log" | tail -8
grep -A8 "^| fresh process" "$OUT/overhead_tiny.log"
echo "== deployment overhead, GPT-2 124M shape, 4 SuperNodes on GPU 0, asgd + PCA rank 10"
timeout 385 python3 bench/deployment_overhead.py --data .data --nodes 4 --updates 16 --preset small \
  --device cuda --gpus 0 --profiles packed-log,prefetch-log,packed --run-config 'rule="asgd"' \
  --no-fresh --out "$OUT/overhead_124m.json" > "$OUT/overhead_124m.log" 2>&1
grep -A8 "^| profile" "$OUT/overhead_124m.log" | tail -10
grep -i "tokens/s\|GiB\|MiB" "$OUT/overhead_124m.log" | tail -12
tail -3 "$OUT/overhead_124m.log"
