#!/usr/bin/env bash
# GPU measurements, part 4 (one device call): the server's decode+apply rows that part 1's
# time slot did not reach (QRCP and CUR payloads, every rule), 124M shape on the GPU.
set -uo pipefail
source "$(dirname "$0")/env.sh"
echo "== server decode+apply (124M, cuda), qrcp and cur"
timeout 300 python3 bench/server_apply.py --device cuda --preset small --repeats 5 --compressors qrcp,cur \
  --tokenizer .data/gpt2 --data .data/wikitext-2-raw/wiki.valid.raw --out "$OUT/server_apply_qrcp_cur.json" \
  2>&1 | tail -20 | tee "$OUT/server_apply_qrcp_cur.txt"
