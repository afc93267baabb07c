#!/usr/bin/env bash
# Start the SuperLink: Flower's hub that the coordinator (ServerApp) and the SuperNodes talk through.
# Its Fleet, Control and Runtime APIs are HTTP(S) on one --port (flwr 1.41).
#
#   deploy/superlink.sh --certs DIR [--host 0.0.0.0] [--port 9093] [--database state.db]
#   deploy/superlink.sh --insecure  [--host 127.0.0.1] [--port 9093]
#
# TLS: DIR holds ca.crt, server.crt, server.key from deploy/make-certs.sh; server.crt must name
# the host the SuperNodes and `flwr` dial. --database keeps runs and nodes across restarts.
set -euo pipefail
. "$(dirname "$0")/common.sh"
host=127.0.0.1 port=9093 certs="" insecure=0 database=""
while [ $# -gt 0 ]; do
  case $1 in
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --certs) certs=$2; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --database) database=$2; shift 2 ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
done
args=(--host "$host" --port "$port" --disable-runtime-dependency-installation)
[ -n "$database" ] && args+=(--database "$database")
if [ -n "$certs" ]; then
  for f in ca.crt server.crt server.key; do [ -f "$certs/$f" ] || die "$certs/$f is missing; run deploy/make-certs.sh $certs"; done
  args+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.crt" --ssl-keyfile "$certs/server.key")
elif [ "$insecure" = 1 ]; then
  args+=(--insecure)
else
  die "pass --certs DIR (TLS) or --insecure (plaintext, trusted networks only)"
fi
exec flower-superlink "${args[@]}"
