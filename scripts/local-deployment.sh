#!/usr/bin/env bash
# Run asyncfl as a real Flower deployment on 127.0.0.1: a TLS SuperLink with SuperNode
# authentication, N registered SuperNodes, `flwr run` to completion, then stop everything.
# The work is done by asyncfl/deploy/local.py (python -m asyncfl.deploy.local; see its
# docstring / --help); the checkout goes first on PYTHONPATH, so it runs uninstalled too.
set -euo pipefail

usage() {
  echo "usage: $(basename "$0") N [--run-config \"k=v ...\"] [--insecure] [--work-dir DIR] [--help for all options]" >&2
}

if [[ $# -lt 1 ]]; then
  usage
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "local-deployment: error: $python not found (set PYTHON)" >&2; exit 2; }
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m asyncfl.deploy.local "$@"
