# Shared by the deploy scripts: phone-home off, no runtime installs, small wait helpers.
# Source it: `. "$(dirname "$0")/common.sh"`.

export FLWR_TELEMETRY_ENABLED=0                      # no telemetry.flower.ai
export FLWR_DISABLE_UPDATE_CHECK=1                   # no update check against api.flower.ai
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # never `uv sync` torch+CUDA into a run venv
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
export PYTHONUNBUFFERED=1

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$DEPLOY_DIR/.." && pwd)"
PYTHON="${PYTHON:-python3}"

die() { echo "error: $*" >&2; exit 1; }

# free_port: a port on 127.0.0.1 that nothing listens on right now.
free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_file FILE SECONDS [PID]: until FILE exists; fail early if PID has exited.
wait_file() {
  local file=$1 deadline=$((SECONDS + $2)) pid=${3:-}
  until [ -s "$file" ]; do
    [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && die "process $pid exited before writing $file"
    [ "$SECONDS" -ge "$deadline" ] && die "timed out after $2 s waiting for $file"
    sleep 0.1
  done
}

# wait_http URL SECONDS PID [CURL_ARGS...]: until URL answers (any HTTP status); fail if PID exits.
wait_http() {
  local url=$1 deadline=$((SECONDS + $2)) pid=$3; shift 3
  until curl -s -o /dev/null "$@" "$url"; do
    kill -0 "$pid" 2>/dev/null || die "process $pid exited before $url answered"
    [ "$SECONDS" -ge "$deadline" ] && die "timed out after $2 s waiting for $url"
    sleep 0.2
  done
}

# descendants PID: the PIDs of every process below PID (a SuperLink's flwr-serverapp, say).
descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}

# stop_pids PID...: SIGTERM to each PID and everything below it, wait up to 15 s for all of
# them (children included, so none outlives the script), then SIGKILL what is left.
stop_pids() {
  local pid left deadline=$((SECONDS + 15)) all=()
  for pid in "$@"; do all+=("$pid" $(descendants "$pid")); done
  for pid in "${all[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  while :; do
    left=""
    for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && left="$left $pid"; done
    [ -z "$left" ] && return 0
    [ "$SECONDS" -ge "$deadline" ] && break
    sleep 0.2
  done
  echo "killing processes that ignored SIGTERM:$left" >&2
  for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
}
