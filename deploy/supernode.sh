#!/usr/bin/env bash
# Start one SuperNode: one federated client. It runs the bpfree ClientApp for every message, which
# drives this client's stage workers (started with `bpfree worker`, see deploy/README.md).
#
#   deploy/supernode.sh --superlink HOST:PORT --partition K --num-partitions N \
#       --stages HOST:PORT,HOST:PORT [--port 9094] [--certs DIR | --insecure] [--data-dir DIR] \
#       [--dataset npz:PATH | csv:DIR | folder:PATH] [--device cuda:0]
#
# --stages: this client's stage workers in stage order (omit to launch local workers per round).
# --port: this SuperNode's own Runtime API port; every SuperNode on a host needs a distinct one.
# --certs DIR: verify the SuperLink with DIR/ca.crt; --stage-tls: the stage workers serve TLS too
#   (certificates from the same CA), so the ClientApp verifies them with DIR/ca.crt.
# --dataset: this site's own data, trained and evaluated instead of a partition of the run's
#   dataset (it must have the run's sample shape and classes; it never leaves this node).
# The stage workers' shared token, if any, comes from $BPFREE_TOKEN.
set -euo pipefail
. "$(dirname "$0")/common.sh"
superlink="" partition="" num="" stages="" port=9094 certs="" insecure=0 data_dir="" dataset="" device="" stage_tls=0
while [ $# -gt 0 ]; do
  case $1 in
    --superlink) superlink=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --num-partitions) num=$2; shift 2 ;;
    --stages) stages=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --certs) certs=$2; shift 2 ;;
    --stage-tls) stage_tls=1; shift ;;
    --insecure) insecure=1; shift ;;
    --data-dir) data_dir=$2; shift 2 ;;
    --dataset) dataset=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
done
[ -n "$superlink" ] && [ -n "$partition" ] && [ -n "$num" ] || die "--superlink, --partition and --num-partitions are required"
node_config="partition-id=$partition num-partitions=$num"
[ -n "$stages" ] && node_config="$node_config stage-addresses=\"$stages\""
[ -n "$data_dir" ] && node_config="$node_config data-dir=\"$data_dir\""
[ -n "$dataset" ] && node_config="$node_config dataset=\"$dataset\""
[ -n "$device" ] && node_config="$node_config device=\"$device\""
[ "$stage_tls" = 1 ] && { [ -n "$certs" ] || die "--stage-tls needs --certs DIR"; node_config="$node_config stage-tls-ca=\"$certs/ca.crt\""; }
args=(--superlink "$superlink" --port "$port" --node-config "$node_config")
if [ -n "$certs" ]; then
  [ -f "$certs/ca.crt" ] || die "$certs/ca.crt is missing"
  args+=(--root-certificates "$certs/ca.crt")
elif [ "$insecure" = 1 ]; then
  args+=(--insecure)
else
  die "pass --certs DIR (TLS) or --insecure (plaintext, trusted networks only)"
fi
exec flower-supernode "${args[@]}"
