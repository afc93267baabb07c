# Shared by deploy/ray/head.sh and worker.sh: environment every Ray node of a bpfree cluster needs.
# Source it after ../common.sh.

export RAY_USAGE_STATS_ENABLED=0          # never phone home
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0

# ray_tls CERTS_DIR: stage actors on this node serve TLS with this node's certificate. Actors
# inherit the environment of `ray start`, so export the files' paths here (client/ray_stage.py).
ray_tls() {
  local dir; dir=$(cd "$1" && pwd) || die "certificate directory $1 does not exist"
  for f in ca.crt server.crt server.key; do
    [ -f "$dir/$f" ] || die "$dir/$f is missing; run deploy/make-certs.sh $1 IP:<this node's IP> ..."
  done
  export BPFREE_TLS_CERT="$dir/server.crt" BPFREE_TLS_KEY="$dir/server.key" BPFREE_TLS_CA="$dir/ca.crt"
}

# ray_bin: the `ray` of the Python that has bpfree installed (every node must import bpfree).
ray_bin() {
  "$PYTHON" -c 'import bpfree_core, client, server' 2>/dev/null \
    || die "$PYTHON cannot import bpfree; run \`pip install -e .\` in $REPO_DIR on this node"
  local bin; bin="$("$PYTHON" -c 'import sys, pathlib; print(pathlib.Path(sys.executable).with_name("ray"))')"
  [ -x "$bin" ] && echo "$bin" || command -v ray || die "ray is not installed for $PYTHON"
}
