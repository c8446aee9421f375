#!/usr/bin/env bash
# Reproduces the table of docs/cluster.md: the same fan-out load (2,000 subscribers over 20
# workspaces, 20 events/s per workspace published to the first node) on one node with the local
# bus, one node on Redis, and three nodes on one Redis with the subscribers spread over them.
# Redis's CPU is sampled from /proc and its own PUBLISH statistics (INFO commandstats).
#
# Usage: loadtest/scripts/cluster.sh      (DUR=20s by default; needs redis-server and redis-cli)
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
RPORT=6391
redis-server --port $RPORT --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
RPID=$!
trap 'kill $RPID 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ "$(redis-cli -p $RPORT PING 2>/dev/null)" = PONG ] && break; sleep 0.1; done
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

row() { # label bus nodes
  local pids=() urls=()
  for i in $(seq 0 $(($3 - 1))); do
    "$BIN/causeloop-stream" --listen 127.0.0.1:$((4800 + i * 2)) --internal-listen 127.0.0.1:$((4801 + i * 2)) \
      --shards 1 --bus "$2" >"$OUT/$1-node$i.log" 2>&1 &
    pids+=($!)
    urls+=(--url ws://127.0.0.1:$((4800 + i * 2)))
  done
  sleep 0.7
  redis-cli -p $RPORT CONFIG RESETSTAT >/dev/null
  local r0 r1 upc
  r0=$(cpu_ticks $RPID)
  "$BIN/causeloop-loadtest" fanout "${urls[@]}" --internal http://127.0.0.1:4801 --connections 2000 --workspaces 20 \
    --rate 20 --duration "$DUR" --processes 2 --source-ips 127.0.0.2-127.0.0.9 --json "$OUT/$1.json" >/dev/null 2>"$OUT/$1.log"
  r1=$(cpu_ticks $RPID)
  upc=$(redis-cli -p $RPORT INFO commandstats | sed -n 's/^cmdstat_publish:.*usec_per_call=\([0-9.]*\).*/\1/p')
  kill "${pids[@]}"
  wait "${pids[@]}" 2>/dev/null || true
  python3 - "$OUT/$1.json" "$1" "$r0" "$r1" "${upc:-0}" <<'PY'
import json, sys
path, label, r0, r1, upc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = json.load(open(path)); f = r["fanout"]; ev = f["published_events"]
tick_us = 10_000  # /proc CPU times are in 10 ms clock ticks
print(f"| {label} | {f['delivered_per_s']:.0f} | {f['latency_us']['p50']} | {f['latency_us']['p99']} | {f['lost']} | {ev} | "
      f"{(r1 - r0) * tick_us / ev if ev else 0:.1f} | {upc} | {r['loadtest']['worker_max_core_share'] * 100:.0f} |")
PY
  sleep 1
}

echo "| setup | delivered/s | p50 µs | p99 µs | lost | events published | Redis process CPU µs/event | Redis PUBLISH µs/call | load tester % core |"
echo "|---|---|---|---|---|---|---|---|---|"
row "one node, local bus" local 1
row "one node on Redis" "redis://127.0.0.1:$RPORT" 1
row "three nodes on one Redis" "redis://127.0.0.1:$RPORT" 3
