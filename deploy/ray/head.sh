#!/usr/bin/env bash
# Start the head node of a Ray cluster for `bpfree simulate --backend ray` (runs in the foreground;
# Ctrl-C or SIGTERM to this process stops the node and every actor on it).
#
#   deploy/ray/head.sh [--port 6379] [--num-gpus N] [--num-cpus N] [--node-ip IP] [--certs DIR] \
#       [--temp-dir /tmp/ray-bpfree] [-- MORE_RAY_START_ARGS]
#
# --num-gpus / --num-cpus: what this node offers (default: what Ray detects).
# --node-ip: the address other nodes reach this one on (default: Ray's pick of the primary interface).
# --certs DIR: stage actors on this node serve TLS (DIR from deploy/make-certs.sh; its server
#   certificate must name this node's IP). Then run the job with --set pipeline.tls_ca=DIR/ca.crt.
# The head also works as a worker: its GPUs and CPUs take stages too.
# Open to the other nodes: this --port (GCS), and Ray's node/object-manager and worker ports
# (see https://docs.ray.io/en/latest/ray-core/configure.html#ports-configurations); stage actors
# listen on ephemeral ports of each node's IP, so the nodes must reach each other on any TCP port
# (a private network or VPN), or pin Ray's ports and firewall the rest.
set -euo pipefail
. "$(dirname "$0")/../common.sh"
. "$(dirname "$0")/common-ray.sh"
port=6379 args=()
while [ $# -gt 0 ]; do
  case $1 in
    --port) port=$2; shift 2 ;;
    --num-gpus) args+=(--num-gpus "$2"); shift 2 ;;
    --num-cpus) args+=(--num-cpus "$2"); shift 2 ;;
    --node-ip) args+=(--node-ip-address "$2"); shift 2 ;;
    --temp-dir) args+=(--temp-dir "$2"); shift 2 ;;   # keep it short: Ray's unix sockets live there
    --certs) ray_tls "$2"; shift 2 ;;
    --) shift; args+=("$@"); break ;;   # the rest goes to `ray start` unchanged
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
done
ray=$(ray_bin)
echo "starting the Ray head on port $port; join it with: deploy/ray/worker.sh --address <this IP>:$port" >&2
exec "$ray" start --head --block --port="$port" --include-dashboard=false --disable-usage-stats \
  ${args[@]+"${args[@]}"}
