#!/usr/bin/env bash
# Make the TLS material and SuperNode keys for a Flower deployment of asyncfl.
#
# Writes into DIR (default ./certs):
#   ca.crt, ca.key            a private certificate authority (kept if it already exists)
#   server.pem, server.key    a server certificate signed by the CA, with every NAME given as a
#                             subjectAltName (IP addresses as IP SANs, the rest as DNS SANs);
#                             used by flower-superlink (--ssl-certfile/--ssl-keyfile) and, in the
#                             docker topology, by each SuperNode's Runtime API
#   keys/node-I, node-I.pub   one ECDSA P-384 key pair per SuperNode, I = 1..N, in OpenSSH format
#                             (flower-supernode --auth-supernode-private-key keys/node-I;
#                             flwr supernode register keys/node-I.pub <connection>); existing
#                             pairs are kept, so raising N later only adds keys
#   superexec.secret          a random shared secret for --superexec-auth-secret-file (process
#                             isolation: only SuperExecs holding it may take tasks)
#
# Re-running re-issues the server certificate for the names given; pass -f to also replace the
# CA (then every old certificate stops being trusted).
set -euo pipefail

usage() {
  cat <<EOF
usage: $(basename "$0") [-d DIR] [-n NUM_NODES] [-f] [NAME_OR_IP ...]
  -d DIR        output folder (default: ./certs)
  -n NUM_NODES  SuperNode key pairs to make (default: 2)
  -f            replace an existing CA as well
  NAME_OR_IP    subjectAltNames of the server certificate (default: localhost 127.0.0.1 ::1);
                list every name and address SuperNodes and the flwr CLI use to reach the SuperLink
EOF
}

die() { echo "make-certs: error: $*" >&2; exit 1; }

dir=certs
nodes=2
force=0
while getopts ":d:n:fh" opt; do
  case $opt in
    d) dir=$OPTARG ;;
    n) nodes=$OPTARG ;;
    f) force=1 ;;
    h) usage; exit 0 ;;
    :) usage >&2; die "option -$OPTARG needs a value" ;;
    *) usage >&2; die "unknown option -$OPTARG" ;;
  esac
done
shift $((OPTIND - 1))
[[ $nodes =~ ^[0-9]+$ ]] || die "NUM_NODES must be a non-negative integer, got '$nodes'"
command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"

names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(localhost 127.0.0.1 ::1)

# subjectAltName list: IPv4/IPv6 literals become IP entries, everything else DNS entries.
san=""
for n in "${names[@]}"; do
  if [[ $n =~ ^[0-9]+(\.[0-9]+){3}$ || $n == *:* ]]; then
    entry="IP:$n"
  elif [[ $n =~ ^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$ ]]; then
    entry="DNS:$n"
  else
    die "'$n' is neither an IP address nor a host name"
  fi
  san+="${san:+,}$entry"
done

mkdir -p "$dir/keys"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ $force -eq 1 || ! -s $dir/ca.crt || ! -s $dir/ca.key ]]; then
  openssl req -x509 -newkey rsa:4096 -sha256 -days 3650 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "/CN=asyncfl deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>"$tmp/err" || { cat "$tmp/err" >&2; die "could not create the CA"; }
  echo "make-certs: new CA $dir/ca.crt"
fi

cat >"$tmp/ext.cnf" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EOF
openssl req -newkey rsa:4096 -sha256 -nodes -keyout "$dir/server.key" -out "$tmp/server.csr" \
  -subj "/CN=${names[0]}" 2>"$tmp/err" || { cat "$tmp/err" >&2; die "could not create the server key"; }
openssl x509 -req -in "$tmp/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 825 -sha256 -extfile "$tmp/ext.cnf" -out "$dir/server.pem" 2>"$tmp/err" \
  || { cat "$tmp/err" >&2; die "could not sign the server certificate"; }
rm -f "$dir/ca.srl"
openssl verify -CAfile "$dir/ca.crt" "$dir/server.pem" >/dev/null \
  || die "the new server certificate does not verify against $dir/ca.crt"
echo "make-certs: server certificate $dir/server.pem for $san"

# OpenSSH-format ECDSA P-384 keys: flower-supernode reads the private key with
# load_ssh_private_key and `flwr supernode register` the public key with load_ssh_public_key.
make_node_key() {
  local key=$1
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$(basename "$key")" -f "$key"
  else
    python3 - "$key" <<'EOF'
import sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
path = Path(sys.argv[1])
path.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
pub = key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
Path(f"{path}.pub").write_bytes(pub + b" " + path.name.encode() + b"\n")
EOF
  fi
}
for ((i = 1; i <= nodes; i++)); do
  key="$dir/keys/node-$i"
  if [[ -s $key && -s $key.pub ]]; then continue; fi
  rm -f "$key" "$key.pub"
  make_node_key "$key" || die "could not create the key pair $key"
done
[[ $nodes -eq 0 ]] || echo "make-certs: SuperNode keys $dir/keys/node-{1..$nodes}{,.pub}"

if [[ $force -eq 1 || ! -s $dir/superexec.secret ]]; then
  openssl rand -hex 32 | tr -d '\n' >"$dir/superexec.secret"
fi
chmod 600 "$dir"/*.key "$dir/superexec.secret"
chmod 644 "$dir/ca.crt" "$dir/server.pem"
[[ $nodes -eq 0 ]] || chmod 644 "$dir"/keys/*.pub
echo "make-certs: done ($dir)"
