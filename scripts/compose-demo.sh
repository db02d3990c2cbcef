#!/usr/bin/env bash
# The docker-compose demo, run for real: build the images, bring up the topology (SuperLink,
# SuperNodes, their SuperExec containers; TLS, SuperNode auth, SuperExec secret), run the tiny
# preset to completion with `flwr run`, check summary.json on the results volume, take it all
# down (and the Docker daemon, if this started one), also on failure. Exit 0 only when all of
# that worked; 3 when no Docker daemon can be had at all. The work is done by
# asyncfl/deploy/compose.py (python -m asyncfl.deploy.compose; its docstring and --help say more).
#
#   scripts/compose-demo.sh                       # Flower's images (Docker Hub)
#   scripts/compose-demo.sh --base local          # no registry: a local base (docker/build-local-base.sh)
#   scripts/compose-demo.sh --install --base local   # CI: install docker.io, debootstrap, Compose v2 first
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "compose-demo: error: $python not found (set PYTHON)" >&2; exit 2; }
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m asyncfl.deploy.compose "$@"
