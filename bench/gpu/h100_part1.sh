#!/usr/bin/env bash
# GPU measurements, part 1 (one device call): training throughput (bare vs in-FL), the
# compressors and the server's decode+apply, all on the GPT-2 124M shape. Run from the repo
# root on the GPU machine with `.whl` (shared/tools/gpu-wheels.sh) and `.data` (a copy of
# ../shared/data plus tokens.npy) carried.
set -uo pipefail
source "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, flwr; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'flwr', flwr.__version__)" | tee -a "$OUT/gpu.txt"
D="--tokenizer .data/gpt2 --data-dir .data/wikitext-2-raw"
tp() { local t=$1; shift; timeout "$t" python3 bench/train_throughput.py --device cuda --preset small --block-size 1024 $D "$@"; }
echo "== throughput: full, bf16, compile"; tp 180 --batch-size 16 --steps 100 --repeats 3 --compile --json "$OUT/tp_full_compile.json" 2>&1 | grep -v Warning | tee "$OUT/tp_full_compile.txt"
echo "== throughput: full, bf16, eager";   tp 80 --batch-size 16 --steps 60 --repeats 2 --no-fl 2>&1 | tail -15 | tee "$OUT/tp_full_eager.txt"
echo "== throughput: LoRA r16, bf16, compile"; tp 110 --batch-size 16 --steps 60 --repeats 2 --lora-rank 16 --compile 2>&1 | tail -15 | tee "$OUT/tp_lora.txt"
echo "== compressors"; timeout 120 python3 bench/compressors.py --device cuda --preset small --tokens .data/tokens.npy --repeats 20 --out "$OUT/compressors.json" 2>&1 | tail -30 | tee "$OUT/compressors.txt"
echo "== server decode+apply (124M, cuda)"
timeout 170 python3 bench/server_apply.py --device cuda --preset small --repeats 5 --tokenizer .data/gpt2 \
  --data .data/wikitext-2-raw/wiki.valid.raw --out "$OUT/server_apply.json" 2>&1 | tail -30 | tee "$OUT/server_apply.txt"
