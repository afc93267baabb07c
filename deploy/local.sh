#!/usr/bin/env bash
# A whole federated deployment on this machine over loopback: K clients, each with S stage
# workers (`bpfree worker`), one SuperLink, K SuperNodes, then `flwr run`. The same commands,
# with real host names, make a multi-machine deployment (see deploy/README.md).
# Every daemon this script starts is stopped by its PID when it exits (also on Ctrl-C).
#
#   deploy/local.sh [--clients 3] [--stages 2] [--rounds 3] [--tls] [--work DIR]
#                   [--data-dir DIR] [--config FILE.toml] [--set section.key=value ...]
#
# --data-dir DIR: the datasets (default $BPFREE_DATA_DIR; neither: the coordinator and clients
#        download into $BPFREE_CACHE_DIR), passed to the run as train.data_dir, as bpfree simulate does.
# Exit status: 0 when the run wrote its summary; otherwise non-zero, with one sentence saying what
# failed (Flower's full output is in WORK/logs/flwr.log).
# --tls: a private CA and certificates (deploy/make-certs.sh); the SuperLink serves HTTPS, and the
#        stage workers serve TLS verified by the same CA.
# --work DIR: logs, certificates, FLWR_HOME and the run directory (DIR/runs/flwr-<run id>);
#        default runs/deploy-<time>.
set -euo pipefail
. "$(dirname "$0")/common.sh"
K=3 S=2 rounds="" tls=0 work="" config="" sets=() data_dir=${BPFREE_DATA_DIR:-}
while [ $# -gt 0 ]; do
  case $1 in
    --clients) K=$2; shift 2 ;;
    --stages) S=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --tls) tls=1; shift ;;
    --work) work=$2; shift 2 ;;
    --config) config=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
    --set) sets+=("$2"); shift 2 ;;
    --data-dir) data_dir=$2; shift 2 ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
done
if [ -n "$data_dir" ]; then
  [ -d "$data_dir" ] || die "--data-dir $data_dir does not exist; give the directory with the dataset files"
  data_dir=$(cd "$data_dir" && pwd)
fi
work=${work:-$REPO_DIR/runs/deploy-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$work/logs" "$work/ports"
work=$(cd "$work" && pwd)
export FLWR_HOME="$work/flwr-home" BPFREE_RUNS_DIR="$work/runs"
mkdir -p "$FLWR_HOME"

pids=()
cleanup() { [ ${#pids[@]} -eq 0 ] || stop_pids "${pids[@]}"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

scheme=http tls_args=(--insecure) curl_args=() worker_tls=() node_tls=(--insecure)
if [ "$tls" = 1 ]; then
  "$DEPLOY_DIR/make-certs.sh" "$work/certs" >/dev/null
  scheme=https tls_args=(--certs "$work/certs") curl_args=(--cacert "$work/certs/ca.crt")
  worker_tls=(--tls-cert "$work/certs/server.crt" --tls-key "$work/certs/server.key" --tls-ca "$work/certs/ca.crt")
  node_tls=(--certs "$work/certs" --stage-tls)
fi

# 1. Stage workers: S per client, each on a free loopback port it reports in a port file.
for ((k = 0; k < K; k++)); do
  for ((s = 0; s < S; s++)); do
    "$PYTHON" -m bpfree worker --listen 127.0.0.1:0 --port-file "$work/ports/c$k-s$s.port" \
      ${worker_tls[@]+"${worker_tls[@]}"} > "$work/logs/worker-c$k-s$s.log" 2>&1 &
    pids+=($!)
  done
done
declare -a stage_addresses
i=0
for ((k = 0; k < K; k++)); do
  addrs=""
  for ((s = 0; s < S; s++)); do
    wait_file "$work/ports/c$k-s$s.port" 120 "${pids[$i]}"; i=$((i + 1))
    addrs="$addrs${addrs:+,}127.0.0.1:$(cat "$work/ports/c$k-s$s.port")"
  done
  stage_addresses[$k]=$addrs
  echo "client $k: stage workers $addrs"
done

# 2. The SuperLink.
link_port=$(free_port)
"$DEPLOY_DIR/superlink.sh" --port "$link_port" "${tls_args[@]}" > "$work/logs/superlink.log" 2>&1 &
pids+=($!)
wait_http "$scheme://127.0.0.1:$link_port/health" 60 "$!" ${curl_args[@]+"${curl_args[@]}"}
echo "SuperLink on $scheme://127.0.0.1:$link_port"

# 3. One SuperNode per client, each told its partition and its stage workers.
for ((k = 0; k < K; k++)); do
  "$DEPLOY_DIR/supernode.sh" --superlink "127.0.0.1:$link_port" --partition "$k" \
    --num-partitions "$K" --stages "${stage_addresses[$k]}" --port "$(free_port)" "${node_tls[@]}" \
    > "$work/logs/supernode-$k.log" 2>&1 &
  pids+=($!)
done

# 4. The run: `flwr run` submits the app; the coordinator waits for the K SuperNodes.
if [ "$tls" = 1 ]; then conn="root-certificates = \"$work/certs/ca.crt\""; else conn="insecure = true"; fi
printf '[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:%s"\n%s\n' \
  "$link_port" "$conn" > "$FLWR_HOME/config.toml"
overrides="federation.clients=$K;pipeline.stages=$S"
[ -n "$rounds" ] && overrides="$overrides;federation.rounds=$rounds"
[ -n "$data_dir" ] && overrides="$overrides;train.data_dir=$data_dir"
for s in ${sets[@]+"${sets[@]}"}; do overrides="$overrides;$s"; done
echo "run submitted; Flower's output goes to $work/logs/flwr.log"
status=0
flwr run "$REPO_DIR" deploy --stream --run-config "config-toml='$config' overrides='$overrides'" \
  > "$work/logs/flwr.log" 2>&1 || status=$?
run_dir=$(ls -d "$BPFREE_RUNS_DIR"/flwr-* 2>/dev/null | tail -1)
if [ "$status" -ne 0 ] || [ -z "$run_dir" ] || [ ! -f "$run_dir/summary.json" ]; then
  reason=$("$PYTHON" -c 'import sys; from pathlib import Path; from bpfree.server.flower_run import last_error; print(last_error(Path(sys.argv[1])))' "$work/logs/flwr.log" 2>/dev/null || echo "see the log")
  die "the federated run failed: $reason (full log: $work/logs/flwr.log)"
fi
"$PYTHON" -c 'import json, sys; s = json.load(open(sys.argv[1])); print("test accuracy %.4f after %d round(s)" % (s["test_accuracy"], s["rounds"]))' "$run_dir/summary.json"
echo "run directory: $run_dir"
