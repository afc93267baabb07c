#!/usr/bin/env bash
# Generate a private CA (if needed) and a server certificate signed by it, for TLS on the
# SuperLink (Flower's HTTP APIs) and on the stage workers' gRPC servers.
#
#   deploy/make-certs.sh OUT_DIR [SAN ...]              # new CA in OUT_DIR; SANs default to
#                                                       # DNS:localhost IP:127.0.0.1
#   deploy/make-certs.sh --ca CA_DIR OUT_DIR [SAN ...]  # sign with CA_DIR/ca.{crt,key}
#                                                       # (created there if missing)
#   e.g. deploy/make-certs.sh --ca certs certs/link DNS:link.example.org
#        deploy/make-certs.sh --ca certs certs/gpu1 DNS:gpu1.example.org IP:10.0.0.11
#
# Writes OUT_DIR/server.crt + server.key (that host's servers) and OUT_DIR/ca.crt (give it to every
# SuperNode, `flwr` and pipeline client). Keep ca.key offline. Every host name or IP that clients
# dial must be among the SANs.
set -euo pipefail
ca_dir=""
if [ "${1:-}" = "--ca" ]; then ca_dir=${2:?--ca needs a directory}; shift 2; fi
out=${1:?usage: make-certs.sh [--ca CA_DIR] OUT_DIR [SAN ...]}; shift
sans=("$@"); [ ${#sans[@]} -gt 0 ] || sans=(DNS:localhost IP:127.0.0.1)
command -v openssl >/dev/null || { echo "error: openssl is not installed" >&2; exit 1; }
ca_dir=${ca_dir:-$out}
mkdir -p "$out" "$ca_dir"
out=$(cd "$out" && pwd); ca_dir=$(cd "$ca_dir" && pwd)
umask 077
san_list=$(IFS=,; echo "${sans[*]}")

if [ ! -f "$ca_dir/ca.key" ]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -days 365 -nodes -keyout "$ca_dir/ca.key" \
    -out "$ca_dir/ca.crt" -subj "/CN=bpfree CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 644 "$ca_dir/ca.crt"
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
openssl req -newkey rsa:3072 -sha256 -nodes -keyout "$out/server.key" -out "$tmp/server.csr" \
  -subj "/CN=${sans[0]#*:}" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san_list" > "$tmp/server.ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
  -CAcreateserial -CAserial "$tmp/ca.srl" -days 365 -sha256 -extfile "$tmp/server.ext" \
  -out "$out/server.crt" 2>/dev/null
[ "$ca_dir" = "$out" ] || cp "$ca_dir/ca.crt" "$out/ca.crt"
chmod 644 "$out/server.crt" "$out/ca.crt"
echo "wrote $out/server.crt, server.key, ca.crt for $san_list (CA in $ca_dir)"
