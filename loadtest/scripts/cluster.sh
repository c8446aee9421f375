#!/usr/bin/env bash
# Reproduces the table of docs/cluster.md: the same fan-out load (2,000 subscribers over 20
# workspaces, 20 events/s per workspace published to the first node) on one node with the local
# bus, one node on Redis, three nodes on one Redis with the subscribers spread over them, and
# three nodes on a three-master Redis Cluster (sharded pub/sub), each cluster setup with wire
# format 1 and with wire format 2 (--bus-wire 2: the publish function, history in Redis). Redis's
# CPU and the nodes' CPU are sampled from /proc (summed over the masters, over the nodes), and
# Redis's own statistics of the publish command (INFO commandstats: PUBLISH/SPUBLISH, or FCALL).
#
# Usage: loadtest/scripts/cluster.sh      (DUR=20s, WORKSPACES=20 by default; needs redis-server and
#        redis-cli). WORKSPACES=200 keeps the 40,000 frames/s but publishes ten times the events.
# Output: a markdown table on stdout; JSON reports in target/cluster/.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --workspace -q
export CAUSELOOP_JWT_HS256_SECRET=cluster-secret-0123456789abcdef0123456789
export CAUSELOOP_PUBLISH_KEY=cluster-publish-key
BIN=target/release
OUT=target/cluster
mkdir -p "$OUT"
DUR=${DUR:-20s}
WORKSPACES=${WORKSPACES:-20}
RPORT=6391
CPORTS=(6394 6395 6396)
RDIR=$(mktemp -d)
REDIS_PIDS=()
trap 'kill "${REDIS_PIDS[@]}" 2>/dev/null || true; rm -rf "$RDIR"' EXIT
start_redis() { # port [extra args...]
  local port=$1
  shift
  (cd "$RDIR" && exec redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no "$@") >/dev/null 2>&1 &
  REDIS_PIDS+=($!)
  for _ in $(seq 50); do [ "$(redis-cli -p "$port" PING 2>/dev/null)" = PONG ] && break; sleep 0.1; done
}
start_redis $RPORT
RPID=${REDIS_PIDS[0]}
for p in "${CPORTS[@]}"; do start_redis "$p" --cluster-enabled yes --cluster-config-file "nodes-$p.conf"; done
CPIDS=("${REDIS_PIDS[@]:1}")
redis-cli --cluster create "${CPORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
until redis-cli -p "${CPORTS[0]}" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.2; done
cpu_ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }

row() { # label bus nodes redis-port... (the Redis servers the row uses); WIRE=1|2 in the environment
  local pids=() urls=() wire=${WIRE:-1}
  for i in $(seq 0 $(($3 - 1))); do
    "$BIN/causeloop-stream" --listen 127.0.0.1:$((4800 + i * 2)) --internal-listen 127.0.0.1:$((4801 + i * 2)) \
      --shards 1 --bus "$2" --bus-wire "$wire" >"$OUT/$1-node$i.log" 2>&1 &
    pids+=($!)
    urls+=(--url ws://127.0.0.1:$((4800 + i * 2)))
  done
  local label=$1 ports=("${@:4}") rpids=()
  [ "${ports[0]}" = $RPORT ] && rpids=($RPID) || rpids=("${CPIDS[@]}")
  sleep 0.7
  for p in "${ports[@]}"; do redis-cli -p "$p" CONFIG RESETSTAT >/dev/null; done
  local r0 r1 upc n0 n1
  r0=$(cpu_ticks "${rpids[@]}")
  n0=$(cpu_ticks "${pids[@]}")
  "$BIN/causeloop-loadtest" fanout "${urls[@]}" --internal http://127.0.0.1:4801 --connections 2000 --workspaces "$WORKSPACES" \
    --rate 20 --duration "$DUR" --processes 2 --source-ips 127.0.0.2-127.0.0.9 --json "$OUT/$1.json" >/dev/null 2>"$OUT/$1.log"
  r1=$(cpu_ticks "${rpids[@]}")
  n1=$(cpu_ticks "${pids[@]}")
  # Mean µs per publish call over the servers used: PUBLISH or SPUBLISH, or the function (FCALL,
  # which includes the PUBLISH it makes).
  local stat='s\{0,1\}publish'
  [ "$wire" = 2 ] && stat=fcall
  upc=$(for p in "${ports[@]}"; do redis-cli -p "$p" INFO commandstats; done |
    sed -n "s/^cmdstat_$stat:calls=\([0-9]*\),usec=\([0-9]*\),.*/\1 \2/p" |
    awk '{c += $1; u += $2} END {if (c) printf "%.2f", u / c}')
  kill "${pids[@]}"
  wait "${pids[@]}" 2>/dev/null || true
  python3 - "$OUT/$label.json" "$label" "$r0" "$r1" "${upc:-0}" "$n0" "$n1" <<'PY'
import json, sys
path, label, r0, r1, upc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
n0, n1 = int(sys.argv[6]), int(sys.argv[7])
r = json.load(open(path)); f = r["fanout"]; ev = f["published_events"]
tick_us = 10_000  # /proc CPU times are in 10 ms clock ticks
print(f"| {label} | {f['delivered_per_s']:.0f} | {f['latency_us']['p50']} | {f['latency_us']['p99']} | {f['lost']} | {ev} | "
      f"{(r1 - r0) * tick_us / ev if ev else 0:.1f} | {upc} | {(n1 - n0) * tick_us / ev if ev else 0:.0f} | "
      f"{r['loadtest']['worker_max_core_share'] * 100:.0f} |")
PY
  sleep 1
}

echo "| setup | delivered/s | p50 µs | p99 µs | lost | events published | Redis process CPU µs/event | Redis publish µs/call | nodes' CPU µs/event | load tester % core |"
echo "|---|---|---|---|---|---|---|---|---|---|"
row "one node, local bus" local 1 $RPORT
row "one node on Redis" "redis://127.0.0.1:$RPORT" 1 $RPORT
row "three nodes on one Redis" "redis://127.0.0.1:$RPORT" 3 $RPORT
row "one node, local bus; Redis Cluster idle" local 1 "${CPORTS[@]}"
row "three nodes on a 3-master Redis Cluster" "redis-cluster://127.0.0.1:${CPORTS[0]},127.0.0.1:${CPORTS[1]}" 3 "${CPORTS[@]}"
WIRE=2 row "three nodes on one Redis, wire 2" "redis://127.0.0.1:$RPORT" 3 $RPORT
WIRE=2 row "three nodes on a 3-master Redis Cluster, wire 2" "redis-cluster://127.0.0.1:${CPORTS[0]},127.0.0.1:${CPORTS[1]}" 3 "${CPORTS[@]}"
