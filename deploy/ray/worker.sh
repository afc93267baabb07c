#!/usr/bin/env bash
# Join a worker node to the Ray cluster started by deploy/ray/head.sh (runs in the foreground;
# Ctrl-C or SIGTERM stops this node and every stage actor on it).
#
#   deploy/ray/worker.sh --address HEAD_IP:6379 [--num-gpus N] [--num-cpus N] [--node-ip IP] \
#       [--certs DIR] [--temp-dir /tmp/ray-bpfree] [-- MORE_RAY_START_ARGS]
#
# Same options as head.sh. Every node needs the same bpfree version installed (`pip install -e .`
# in the same checkout); stage actors never read the dataset, only `bpfree simulate` does.
set -euo pipefail
. "$(dirname "$0")/../common.sh"
. "$(dirname "$0")/common-ray.sh"
address="" args=()
while [ $# -gt 0 ]; do
  case $1 in
    --address) address=$2; shift 2 ;;
    --num-gpus) args+=(--num-gpus "$2"); shift 2 ;;
    --num-cpus) args+=(--num-cpus "$2"); shift 2 ;;
    --node-ip) args+=(--node-ip-address "$2"); shift 2 ;;
    --temp-dir) args+=(--temp-dir "$2"); shift 2 ;;
    --certs) ray_tls "$2"; shift 2 ;;
    --) shift; args+=("$@"); break ;;   # the rest goes to `ray start` unchanged
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
done
[ -n "$address" ] || die "--address HEAD_IP:PORT is required (the head prints it)"
ray=$(ray_bin)
exec "$ray" start --address="$address" --block --disable-usage-stats ${args[@]+"${args[@]}"}
