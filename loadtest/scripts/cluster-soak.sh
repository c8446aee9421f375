#!/usr/bin/env bash
# A soak of the Redis bus, with Redis killed and restarted halfway through.
#
# Three causeloop-stream nodes (two shards each) on one Redis; the load tester spreads 3,000
# subscribers over 100 workspaces across the nodes, publishes 5 events/s per workspace to the
# first node, churns 30 connections a second, and keeps 1% of subscribers stalled. At the half-way
# point Redis is killed (SIGKILL, as a crash) and started again 3 seconds later. Prints the load
# tester's figures, each node's bus metrics and every WARN/ERROR line of the nodes' logs.
#
# The nodes run with --bus-wire $WIRE (2 by default: positions, history and resume records in
# Redis) and Redis persists every write (appendfsync always), so the restart keeps the history;
# the load tester reconnects with the same token and counts loss across reconnects
# (--continuity). WIRE=1 runs the former wire format, without persistence.
#
# With CLUSTER=1 the nodes run on a three-master Redis Cluster (no replicas,
# cluster-require-full-coverage no) instead, and the master killed and restarted is the first
# one: a third of the workspaces lose their master for the outage, the rest must not notice.
#
# Usage: loadtest/scripts/cluster-soak.sh     (DUR=10m, CLUSTER=0, WIRE=2 by default; needs
#        redis-server, redis-cli)
# Output: markdown on stdout; JSON report and logs in target/cluster-soak/.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --workspace -q
export CAUSELOOP_JWT_HS256_SECRET=cluster-secret-0123456789abcdef0123456789
export CAUSELOOP_PUBLISH_KEY=cluster-publish-key
BIN=target/release
OUT=target/cluster-soak
mkdir -p "$OUT"
DUR=${DUR:-10m}
RPORT=6393
CLUSTER=${CLUSTER:-0}
WIRE=${WIRE:-2}
PERSIST=(--save "" --appendonly no)
[ "$WIRE" = 2 ] && PERSIST=(--save "" --appendonly yes --appendfsync always)
CPORTS=(6401 6402 6403)
secs() { case "$1" in *m) echo $((${1%m} * 60));; *s) echo "${1%s}";; *) echo "$1";; esac; }
HALF=$(($(secs "$DUR") / 2))

# Redis's pid is kept in a file: the restart happens in a background subshell, and the exit trap
# must stop whichever Redis is running then.
# On a cluster, the first master is the one killed; the others' pids go to others.pid.
start_redis() { # [port [extra args...]]
  local port=${1:-$RPORT}
  shift || true
  mkdir -p "$OUT/data-$port"
  (cd "$OUT" && exec redis-server --port "$port" --bind 127.0.0.1 --dir "data-$port" "${PERSIST[@]}" "$@") >>"$OUT/redis.log" 2>&1 &
  echo $! >"$OUT/redis.pid"
  for _ in $(seq 50); do [ "$(redis-cli -p "$port" PING 2>/dev/null)" = PONG ] && break; sleep 0.1; done
}
cluster_args() { echo --cluster-enabled yes --cluster-config-file "nodes-$1.conf" --cluster-require-full-coverage no; }
for p in $RPORT "${CPORTS[@]}"; do
  if redis-cli -p "$p" PING >/dev/null 2>&1; then
    echo "port $p is taken by another Redis; stop it first" >&2
    exit 1
  fi
done
: >"$OUT/others.pid"
rm -rf "$OUT"/data-*
if [ "$CLUSTER" = 1 ]; then
  rm -rf "$OUT"/data-*
  for p in "${CPORTS[@]:1}"; do
    # shellcheck disable=SC2046
    start_redis "$p" $(cluster_args "$p")
    cat "$OUT/redis.pid" >>"$OUT/others.pid"
  done
  # shellcheck disable=SC2046
  start_redis "${CPORTS[0]}" $(cluster_args "${CPORTS[0]}")
  redis-cli --cluster create "${CPORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
  until redis-cli -p "${CPORTS[0]}" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.2; done
  BUS="redis-cluster://127.0.0.1:${CPORTS[0]},127.0.0.1:${CPORTS[1]}"
  restart_redis() {
    # shellcheck disable=SC2046
    start_redis "${CPORTS[0]}" $(cluster_args "${CPORTS[0]}")
  }
else
  : >"$OUT/others.pid"
  start_redis
  BUS="redis://127.0.0.1:$RPORT"
  restart_redis() { start_redis; }
fi
PIDS=()
for i in 0 1 2; do
  "$BIN/causeloop-stream" --listen 127.0.0.1:$((4950 + i * 2)) --internal-listen 127.0.0.1:$((4951 + i * 2)) --shards 2 \
    --bus "$BUS" --bus-wire "$WIRE" --max-outbound-bytes 65536 --socket-send-buffer 16384 >"$OUT/node$i.log" 2>&1 &
  PIDS+=($!)
done
trap 'kill "${PIDS[@]}" "$(cat "$OUT/redis.pid")" $(cat "$OUT/others.pid") 2>/dev/null || true; rm -f "$OUT/others.pid"' EXIT
sleep 1

(
  sleep $((HALF + 30)) # the load tester's connect phase comes first
  echo "$(date -u +%T) killing Redis" >>"$OUT/events.log"
  kill -9 "$(cat "$OUT/redis.pid")"
  sleep 3
  restart_redis
  echo "$(date -u +%T) Redis restarted" >>"$OUT/events.log"
) &

"$BIN/causeloop-loadtest" slow --url ws://127.0.0.1:4950 --url ws://127.0.0.1:4952 --url ws://127.0.0.1:4954 \
  --internal http://127.0.0.1:4951 --connections 3000 --workspaces 100 --rate 5 --slow-fraction 0.01 --churn 30 --continuity \
  --processes 2 --source-ips 127.0.0.2-127.0.0.9 --duration "$DUR" --json "$OUT/soak.json" >"$OUT/loadtest.txt" 2>"$OUT/loadtest.log"

for i in 0 1 2; do
  echo "node $i: $(curl -s 127.0.0.1:$((4951 + i * 2))/metrics | grep -E '^causeloop_(bus_(up|reconnects_total|messages_total|redirects_total|layout_reads_total|stream_reads_total|stream_gaps_total|records_lost_total)|stream_starts_total)' | tr '\n' ' ')"
done
python3 - "$OUT/soak.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); f = r["fanout"]
print(f"published {f['published_events']}, delivered {f['delivered_frames']}, lost {f['lost']}, reordered {f['reordered']}, repeated {f['repeated']}, stream.gap {f['gaps']}, churned {f['churned']}")
print(f"publish errors {f['publish_errors']}; connect failures {r['connect']['failures']}; closes {r['closes']}; stalled readers {r['slow_closes']}")
print(f"latency p50 {f['latency_us']['p50']} µs, p99 {f['latency_us']['p99']} µs; heartbeat lateness p99 {r['heartbeat_lateness_us']['p99']} µs")
PY
cat "$OUT/events.log" 2>/dev/null || true
grep -h -E 'WARN|ERROR' "$OUT"/node*.log || echo "no WARN or ERROR lines"
