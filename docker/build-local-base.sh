#!/usr/bin/env bash
# Build local/flwr:VERSION, the stand-in for Flower's images (flwr/superlink, flwr/supernode,
# flwr/superexec) on a machine that reaches no container registry, from Debian packages and PyPI
# only:
#   1. local/debian:SUITE: `debootstrap --variant=minbase SUITE` from the Debian mirror apt
#      already uses, imported with `docker import` (skipped when the image exists; --force redoes it)
#   2. local/flwr:VERSION from docker/flwr-local.Dockerfile (Python + flwr==VERSION, uid 49999)
#      in a temporary build context holding this machine's extra CA certificates
#      (/usr/local/share/ca-certificates, where update-ca-certificates looks), so that pip in the
#      build trusts a TLS-intercepting proxy; nothing of it is left in the repository.
# Needs a running Docker daemon (DOCKER_HOST), and root + debootstrap for step 1.
# scripts/compose-demo.sh --base local calls this when local/flwr:VERSION is missing.
set -euo pipefail

usage() {
  cat <<EOF
usage: $(basename "$0") [--suite SUITE] [--mirror URL] [--flwr-version V] [--no-host-ca] [--force]
  --suite SUITE     Debian suite of the base (default bookworm: Python 3.11, as the torch wheel)
  --mirror URL      Debian mirror (default: the one in apt's sources, else http://deb.debian.org/debian)
  --flwr-version V  flwr to install (default \$FLWR_VERSION or 1.42.0)
  --no-host-ca      do not pass /usr/local/share/ca-certificates/*.crt to the build
  --force           rebuild local/debian:SUITE too
EOF
}

die() { echo "build-local-base: error: $*" >&2; exit 1; }
say() { echo "build-local-base: $*" >&2; }

suite=bookworm
mirror=""
flwr_version=${FLWR_VERSION:-1.42.0}
host_ca=1
force=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --suite) suite=${2:?}; shift 2 ;;
    --mirror) mirror=${2:?}; shift 2 ;;
    --flwr-version) flwr_version=${2:?}; shift 2 ;;
    --no-host-ca) host_ca=0; shift ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $1" ;;
  esac
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
command -v docker >/dev/null || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "no Docker daemon answers (set DOCKER_HOST, or use scripts/compose-demo.sh --base local, which starts one)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

debian=local/debian:$suite
if [[ $force -eq 1 ]] || ! docker image inspect "$debian" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  [[ $EUID -eq 0 ]] || die "debootstrap needs root"
  if [[ -z $mirror ]]; then
    # The Debian archive apt uses here (deb822 or one-line sources), else Debian's own.
    mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)\/* *$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    [[ -n $mirror ]] || mirror=$(sed -n 's/^deb \+\(\[[^]]*\] \+\)\?\([^ ]*\/debian\)\/* .*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n 1)
    [[ -n $mirror ]] || mirror=http://deb.debian.org/debian
  fi
  say "debootstrap --variant=minbase $suite from $mirror"
  debootstrap --variant=minbase "$suite" "$tmp/rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
    || { tail -n 20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$tmp"/rootfs/var/cache/apt/archives/*.deb "$tmp"/rootfs/var/lib/apt/lists/*
  tar -C "$tmp/rootfs" -c . | docker import - "$debian" >/dev/null
  rm -rf "$tmp/rootfs"
  say "imported $debian"
else
  say "$debian present"
fi

mkdir -p "$tmp/context/ca"
if [[ $host_ca -eq 1 ]] && [[ -d /usr/local/share/ca-certificates ]]; then
  find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$tmp/context/ca/" \;
fi
say "extra CA certificates for the build: $(ls "$tmp/context/ca" | wc -l)"
image=local/flwr:$flwr_version
say "building $image (flwr==$flwr_version on $debian)"
docker build -f "$here/flwr-local.Dockerfile" \
  --build-arg "DEBIAN_IMAGE=$debian" --build-arg "FLWR_VERSION=$flwr_version" \
  -t "$image" "$tmp/context" >&2
got=$(docker run --rm --entrypoint python "$image" -c "import flwr; print(flwr.__version__)")
[[ $got == "$flwr_version" ]] || die "$image has flwr $got, not $flwr_version"
say "$image ready (flwr $got; flower-superlink, flower-supernode, flower-superexec)"
