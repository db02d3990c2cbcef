#!/usr/bin/env bash
# GPU machine, one device call: two emulated sweeps side by side.
#  * on the CPU cores: the tiny preset (CPU clients) in the timing of a `flwr run` simulation on
#    a 2-core machine (task 2.5 s of compute, 0.2 s overhead, no idle poll) and of a deployment
#    (0.9 s, 1.3 s, 3 s poll, prefetch), many rules x seeds, one core each;
#  * on the GPU: GPT-2 124M shape in the deployment timing (as avs_emulate.sh), a few rules.
#   bash bench/gpu/sweep.sh "TINY_SIM_SPECS" "TINY_DEP_SPECS" "GPU_SPECS" [TINY_SEEDS=11]
# A finished GPU sync run of the same setup can be reused: put its folder under .gpu-out/gpu-a/.
# Carry .whl, .data (and .gpu-out).
set -uo pipefail
source "$(dirname "$0")/env.sh"
tiny_sim=$1; tiny_dep=$2; gpu_specs=$3; tiny_seeds=${4:-11}
mkdir -p "$OUT/gpu-a/runs" && cp -r .gpu-out/gpu-a/* "$OUT/gpu-a/runs/" 2>/dev/null
D="--tokenizer $PWD/.data/gpt2 --data-dir $PWD/.data/wikitext-2-raw"
common="--backend emulate --time-budget-s 150"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -l 10 > "$OUT/smi.csv" &
( timeout 540 python3 bench/async_vs_sync.py $common --preset tiny --device cpu $D --seeds "$tiny_seeds" \
    --jobs 6 --threads 1 --sync "sync,sync:server-lr=1.5" --rules "$tiny_sim" \
    --emulate-args "--task-s 2.5 --overhead-s 0.2 --poll-s 0 --no-server-time" \
    --out "$OUT/tiny-sim" > "$OUT/tiny-sim.log" 2>&1 ) &
( timeout 540 python3 bench/async_vs_sync.py $common --preset tiny --device cpu $D --seeds "${tiny_seeds%%,*}" \
    --jobs 7 --threads 1 --sync "sync" --rules "$tiny_dep" --async-set 'prefetch="on"' \
    --emulate-args "--task-s 0.9 --overhead-s 1.3 --poll-s 3 --jitter 0.15 --no-server-time" \
    --out "$OUT/tiny-dep" > "$OUT/tiny-dep.log" 2>&1 ) &
( timeout 540 python3 bench/async_vs_sync.py $common --preset small --device cuda $D --seeds 11 \
    --jobs 3 --sync "sync" --rules "$gpu_specs" --async-set 'prefetch="on"' --reuse \
    --emulate-args "--task-s 0.9 --overhead-s 1.3 --poll-s 3 --jitter 0.15 --no-server-time" \
    --out "$OUT/gpu-a" > "$OUT/gpu-a.log" 2>&1 ) &
wait
for f in tiny-sim tiny-dep gpu-a; do echo "== $f"; grep -v '^\[async_vs_sync\] \$' "$OUT/$f.log" | tail -22; done
cd "$OUT" && tar czf runs.tgz --exclude='*.png' --exclude=model tiny-sim/runs tiny-dep/runs gpu-a/runs 2>/dev/null
rm -rf tiny-sim/work tiny-dep/work gpu-a/work; ls -la "$OUT"
