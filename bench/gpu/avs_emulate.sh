#!/usr/bin/env bash
# GPU machine, one device call: sweep async rules and the sync baseline's tuning in the emulator
# (asyncfl.emulate: the real loop and real 124M-shape training on a virtual clock whose timing
# model is the deployment's: 4 SuperNodes sharing one GPU, speeds 1,1,2,4, idle poll 3 s,
# prefetch). Several emulated runs share the GPU at once (--no-server-time: the server's own
# work is not timed, so they do not slow each other's clocks).
#   bash bench/gpu/avs_emulate.sh REGIME SEEDS JOBS SYNC_SPECS ASYNC_SPECS
# REGIME: a = local-steps 16 (task compute 0.9 s), b = local-steps 64 (2.7 s). Carry .whl, .data.
# SYNC_SPECS "" runs no sync baseline (async_vs_sync then prints no table; the runs come back in
# runs-REGIME.tgz): with FIXED_S the virtual clock does not depend on the GPU's load, so an
# earlier call's sync runs of the same seeds still compare.
# env: TASK_S (compute per task), OVERHEAD_S (1.3), POLL_S (3: Flower's SuperNode; 0.1 =
# asyncfl-supernode, with which prefetch "auto" queues nothing), PREFETCH ("on"), CALL_S (560),
# FIXED_S (the run config's `task-s`: a task lasts factor x FIXED_S, compute included, as in
# `TASK_S=8 bench/gpu/avs_deploy.sh`; overrides TASK_S), BUDGET_S (150).
set -uo pipefail
source "$(dirname "$0")/env.sh"
regime=${1:-a}; seeds=${2:-11}; jobs=${3:-5}; sync=${4-sync}; rules=${5:-asgd}
case "$regime" in
  a) steps=16; task=${TASK_S:-0.9} ;;
  b) steps=64; task=${TASK_S:-2.7} ;;
  *) echo "regime a or b" >&2; exit 2 ;;
esac
fixed=${FIXED_S:-0}
if [ "$fixed" != 0 ]; then task=0; fi  # the emulator's --task-s 0: the run config's task-s
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -l 5 > "$OUT/smi-$regime.csv" &
timeout "${CALL_S:-560}" python3 bench/async_vs_sync.py --backend emulate --preset small --device cuda \
  --tokenizer "$PWD/.data/gpt2" --data-dir "$PWD/.data/wikitext-2-raw" --seeds "$seeds" \
  --time-budget-s "${BUDGET_S:-150}" --jobs "$jobs" --set "local-steps=$steps task-s=$fixed" \
  --async-set "prefetch=\"${PREFETCH:-on}\"" \
  --emulate-args "--task-s $task --overhead-s ${OVERHEAD_S:-1.3} --poll-s ${POLL_S:-3} --jitter 0.15 --no-server-time" \
  --sync "$sync" --rules "$rules" --out "$OUT/avs-$regime" > "$OUT/avs-$regime.log" 2>&1
echo "exit $?"
tail -45 "$OUT/avs-$regime.log"
cd "$OUT" && tar czf "runs-$regime.tgz" --exclude='*.png' --exclude=model avs-$regime/runs avs-$regime/results.json 2>/dev/null
ls -la "$OUT"
