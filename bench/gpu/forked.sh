#!/usr/bin/env bash
# GPU machine: ClientApp processes forked from a warm zygote (asyncfl-superexec, process
# isolation) against Flower's fresh process per message (subprocess isolation), same settings
# otherwise (packed update-log downlink, asgd + PCA). One device call per part:
#   bash bench/gpu/forked.sh tiny   # tiny preset, 1 SuperNode, CPU client (~4 min)
#   bash bench/gpu/forked.sh 124m   # GPT-2 124M shape, 4 SuperNodes sharing GPU 0 (~9 min)
# Per-update overhead, client tokens/s and GPU memory per process. Carry .whl and .data.
set -uo pipefail
source "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${1:-tiny}" in
tiny)
  echo "== deployment overhead, tiny preset, CPU client, 1 SuperNode, asgd + PCA"
  timeout 400 python3 bench/deployment_overhead.py --data .data --nodes 1 --updates 12 \
    --profiles packed-log,forked-log --run-config 'rule="asgd" compressor="pca"' --repeats 3 \
    --out "$OUT/overhead_tiny.json" > "$OUT/overhead_tiny.log" 2>&1
  grep -A6 "^| profile" "$OUT/overhead_tiny.log" | tail -8
  grep -A8 "^| fresh process" "$OUT/overhead_tiny.log" ;;
124m)
  echo "== deployment overhead, GPT-2 124M shape, 4 SuperNodes on GPU 0, asgd + PCA rank 10"
  timeout 570 python3 bench/deployment_overhead.py --data .data --nodes 4 --updates 20 --preset small \
    --device cuda --gpus 0 --profiles forked-log,packed-log --run-config 'rule="asgd"' \
    --no-fresh --timeout 270 --out "$OUT/overhead_124m.json" > "$OUT/overhead_124m.log" 2>&1
  grep -A8 "^| profile" "$OUT/overhead_124m.log" | tail -10
  grep -i "tokens/s\|GiB\|MiB" "$OUT/overhead_124m.log" | tail -14
  tail -3 "$OUT/overhead_124m.log" ;;
*) echo "usage: $0 tiny|124m" >&2; exit 2 ;;
esac
