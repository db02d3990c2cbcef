# Sourced by bench/gpu/h100_part*.sh on the GPU machine: install the carried wheels (.whl, from
# ../shared/tools/gpu-wheels.sh) and set up the environment; $OUT is where results go.
if [ ! -d /tmp/site/flwr ]; then  # a machine still warm from an earlier call has them
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  # Byte-compile what pip skipped: in deployment every message starts a fresh flwr-clientapp
  # process, which would otherwise compile Flower from source each time.
  python3 -m compileall -q -j 0 /tmp/site > /dev/null
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# asyncfl-superexec (asyncfl/deploy/launcher.py) and asyncfl-supernode (asyncfl/deploy/supernode.py) are console
# scripts of the installed project; here the project runs from the checkout, so put equivalent
# commands on PATH.
printf '#!/bin/sh\nexec python3 -m asyncfl.deploy.launcher "$@"\n' > /tmp/site/bin/asyncfl-superexec
printf '#!/bin/sh\nexec python3 -m asyncfl.deploy.supernode "$@"\n' > /tmp/site/bin/asyncfl-supernode
chmod +x /tmp/site/bin/asyncfl-superexec /tmp/site/bin/asyncfl-supernode
