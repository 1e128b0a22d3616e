#!/usr/bin/env bash
# vLLM's router (vllm-router) on PORT in front of FMBC replicas: the recipes of docs/scale-out.md, used by
# tests/engines/test_router.py, tests/engines/test_multi_host.py and CI.
#
#   bash examples/router.sh DIR PORT [vLLM server flags...]                   # two replicas on this machine
#   REPLICA_URLS="http://HOST1:30001 http://HOST2:30001" bash examples/router.sh PORT   # replicas on other hosts
#
# Runs in the foreground. With DIR, it starts the replicas itself: they serve DIR under the name `fmbc` on
# 127.0.0.1, one CPU core each (flags after PORT go to both, after `--dtype float32`); a replica that exits later
# is started again (the router's health checks take it out and back in). With REPLICA_URLS, it routes to replicas
# already started on their own hosts (`fmbc serve DIR --served-model-name fmbc --host ADDRESS`, kept running
# there by that host's supervisor). Either way, once every replica answers /health the router starts on PORT and
# the script prints its URL. SIGTERM or SIGINT (Ctrl-C) stops the router and the replicas it started, with their
# engine processes, and exits 0 (started with `&` from another script, bash ignores SIGINT: send SIGTERM). If a
# replica does not start (or a remote one does not answer), the script stops what it started and exits 1 with
# the end of that replica's log.
#
# Environment:
#   PYTHON          the Python of vLLM's environment, with fmbc-serve and its `router` extra (vllm-router)
#                   installed (default: python3 on PATH; `bash scripts/venv.sh vllm` makes one)
#   REPLICA_URLS    replicas on other hosts to route to, instead of starting any (space-separated base URLs)
#   REPLICA_CORES   one VLLM_CPU_OMP_THREADS_BIND value per replica (default "0 1"; "0-7 8-15" on 16 cores)
#   REPLICA_PORTS   the replicas' ports (default PORT+1, PORT+2, ...)
#   HOST            the router's address (default 127.0.0.1; 0.0.0.0 listens on every interface)
#   METRICS_PORT    the router's Prometheus port, on 127.0.0.1 (default 29000)
#   LOG_DIR         replica logs and pid files, replica-N.log / replica-N.pid (default: a new temporary folder)
#   START_TIMEOUT   seconds a replica may take to answer /health (default 600)
#   VLLM_CPU_KVCACHE_SPACE  GiB of KV cache per replica (default 1)
set -euo pipefail

usage() {
  echo "usage: bash examples/router.sh DIR PORT [vLLM server flags...]  or  REPLICA_URLS=\"URL...\" bash" \
       "examples/router.sh PORT" >&2
  exit 2
}
read -r -a remote <<<"${REPLICA_URLS:-}"
python=${PYTHON:-python3}
if [ "${#remote[@]}" -gt 0 ]; then  # route to replicas on other hosts
  [ $# = 1 ] || usage
  port=$1 model="" modules=(vllm_router)
else
  [ $# -ge 2 ] || usage
  model=$1 port=$2 modules=(vllm vllm_router)
  shift 2
fi
[[ $port =~ ^[0-9]+$ ]] || usage
[ -z "$model" ] || [ -f "$model/config.json" ] || {
  echo "router.sh: $model is not a checkpoint folder (no config.json)" >&2; exit 2; }
"$python" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, sys.argv[1:])))" "${modules[@]}" \
  2>/dev/null || {
  echo "router.sh: $python cannot import ${modules[*]}: set PYTHON to vLLM's environment with" \
       "fmbc-serve[router] installed (bash scripts/venv.sh vllm)" >&2; exit 2; }
command -v curl >/dev/null || { echo "router.sh: curl is needed for the health checks" >&2; exit 2; }

read -r -a cores <<<"${REPLICA_CORES:-0 1}"
[ -z "$model" ] && cores=()
default_ports=()
for i in "${!cores[@]}"; do default_ports+=("$((port + i + 1))"); done
read -r -a ports <<<"${REPLICA_PORTS:-${default_ports[*]}}"
[ -z "$model" ] && ports=()
[ "${#ports[@]}" = "${#cores[@]}" ] || {
  echo "router.sh: REPLICA_PORTS needs one port per entry of REPLICA_CORES" >&2; exit 2; }
host=${HOST:-127.0.0.1}
log_dir=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fmbc-router.XXXXXX")}
mkdir -p "$log_dir"
pids=() router_pid="" stopping=""

start_replica() {  # replica index, vLLM flags; in its own session, so that a signal to the group reaches the engine
  local i=$1
  shift
  VLLM_CPU_OMP_THREADS_BIND=${cores[i]} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} \
    setsid "$python" -m fmbc_serve.engines.vllm.cli serve "$model" --served-model-name fmbc \
    --host 127.0.0.1 --port "${ports[i]}" --dtype float32 "$@" >>"$log_dir/replica-$i.log" 2>&1 &
  pids[i]=$!
  echo "${pids[i]}" >"$log_dir/replica-$i.pid"
}

stop() {  # every process group this script started: SIGTERM, then SIGKILL after 60 s
  [ -z "$stopping" ] || return 0
  stopping=1
  local group deadline=$((SECONDS + 60))
  for group in $router_pid "${pids[@]}"; do kill -TERM -- "-$group" 2>/dev/null || true; done
  for group in $router_pid "${pids[@]}"; do
    while kill -0 -- "-$group" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -KILL -- "-$group" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap 'echo "router.sh: stopping" >&2; stop; exit 0' TERM INT
trap stop EXIT

healthy() { curl -sf -o /dev/null --max-time 5 "$1"; }

fail_start() {  # replica index, reason
  echo "router.sh: replica $1 (port ${ports[$1]}, core ${cores[$1]}) failed to start: $2. Last lines of" \
       "$log_dir/replica-$1.log:" >&2
  tail -n 30 "$log_dir/replica-$1.log" >&2
  exit 1
}

for i in "${!cores[@]}"; do start_replica "$i" "$@"; done
urls=()
for p in "${ports[@]}"; do urls+=("http://127.0.0.1:$p"); done
if [ -n "$model" ]; then
  echo "router.sh: starting ${#cores[@]} replicas of $model (logs in $log_dir)" >&2
else
  urls=("${remote[@]%/}")
  echo "router.sh: waiting for ${#urls[@]} replicas: ${urls[*]}" >&2
fi
deadline=$((SECONDS + ${START_TIMEOUT:-600}))
for i in "${!urls[@]}"; do
  until healthy "${urls[i]}/health"; do
    if [ -n "$model" ] && ! kill -0 "${pids[i]}" 2>/dev/null; then
      wait "${pids[i]}" && status=0 || status=$?
      fail_start "$i" "exited with status $status"
    fi
    if [ $SECONDS -ge $deadline ]; then
      [ -n "$model" ] || { echo "router.sh: replica ${urls[i]} did not answer /health in ${START_TIMEOUT:-600} s" >&2
                           exit 1; }
      fail_start "$i" "no answer on /health after ${START_TIMEOUT:-600} s"
    fi
    sleep 1
  done
done

# Round robin; a health check every second (two failures take a replica out, one success brings it back);
# circuit breakers count only worker failures (5xx, connection errors, timeouts), never a client's 4xx, and
# an open one is tried again after 5 s (the default 60 s keeps a restarted replica idle for a minute).
setsid "$python" -m vllm_router.launch_router --host "$host" --port "$port" --worker-urls "${urls[@]}" \
  --policy round_robin --health-check-endpoint /health --health-check-interval-secs 1 \
  --health-failure-threshold 2 --health-success-threshold 1 --cb-timeout-duration-secs 5 \
  --prometheus-port "${METRICS_PORT:-29000}" --log-level warning &
router_pid=$!
[ "$host" = 0.0.0.0 ] && local_host=127.0.0.1 || local_host=$host
until healthy "http://$local_host:$port/readiness"; do
  kill -0 "$router_pid" 2>/dev/null || { echo "router.sh: the router exited at start" >&2; exit 1; }
  sleep 0.5
done
echo "router.sh: ready at http://$host:$port/v1 (model fmbc; replicas ${urls[*]})" >&2

while :; do
  wait -n && status=0 || status=$?   # a child exited (or a trapped signal interrupted the wait)
  if ! kill -0 "$router_pid" 2>/dev/null; then
    echo "router.sh: the router exited with status $status" >&2
    exit "$status"
  fi
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      echo "router.sh: replica $i (port ${ports[i]}) exited with status $status; starting it again" >&2
      start_replica "$i" "$@"
    fi
  done
done
