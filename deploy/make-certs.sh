#!/usr/bin/env bash
# Generate a private CA and one server certificate signed by it, for TLS on the SuperLink
# (Flower's Fleet/Control HTTP API) and on the stage workers' gRPC servers.
#
#   deploy/make-certs.sh OUT_DIR [SAN ...]      # SANs default to DNS:localhost IP:127.0.0.1
#   deploy/make-certs.sh certs DNS:link.example.org IP:10.0.0.5
#
# Writes OUT_DIR/ca.crt (give it to every SuperNode, `flwr` and pipeline client), ca.key (keep it
# offline), server.crt + server.key (the servers). Every host name or IP that clients dial must be
# in the SANs; make one server certificate per host in a real deployment.
set -euo pipefail
out=${1:?usage: make-certs.sh OUT_DIR [SAN ...]}; shift
sans=("$@"); [ ${#sans[@]} -gt 0 ] || sans=(DNS:localhost IP:127.0.0.1)
command -v openssl >/dev/null || { echo "error: openssl is not installed" >&2; exit 1; }
mkdir -p "$out"; cd "$out"
umask 077
san_list=$(IFS=,; echo "${sans[*]}")

openssl req -x509 -newkey rsa:3072 -sha256 -days 365 -nodes -keyout ca.key -out ca.crt \
  -subj "/CN=bpfree CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:3072 -sha256 -nodes -keyout server.key -out server.csr \
  -subj "/CN=${sans[0]#*:}" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san_list" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile server.ext -out server.crt 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.crt
echo "wrote $(pwd)/{ca.crt,ca.key,server.crt,server.key} for $san_list"
