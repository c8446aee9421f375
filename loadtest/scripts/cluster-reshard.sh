#!/usr/bin/env bash
# A soak of the Redis Cluster bus while slots move under it.
#
# A three-master Redis Cluster (no replicas) and three causeloop-stream nodes (two shards each) on
# it; the load tester spreads 3,000 subscribers over 100 workspaces across the nodes, publishes
# 5 events/s per workspace to the first node and churns 30 connections a second. Throughout the
# run, every MOVE_EVERY seconds the hash slot of one of the load's workspaces (in turn) moves to
# another master, as a resharding does: importing, migrating, then the new owner announced to
# every master. Each node must follow: re-subscribe at the new owner when Redis ends its
# subscription, and redirect its publishes. Prints the load tester's figures (lost counts events
# accepted and never delivered), each node's bus metrics, and every WARN/ERROR line of the nodes.
#
# The nodes run with --bus-wire $WIRE (2 by default): a slot's keys (the workspace's position,
# history and resume records) move with it (MIGRATE, between MIGRATING and the new owner's
# announcement), and the load tester reconnects with the same token and counts loss across
# reconnects (--continuity).
#
# Usage: loadtest/scripts/cluster-reshard.sh   (DUR=4m, MOVE_EVERY=2, WIRE=2 by default; needs
#        redis-server, redis-cli)
# Output: markdown on stdout; JSON report and logs in target/cluster-reshard/.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --workspace -q
export CAUSELOOP_JWT_HS256_SECRET=cluster-secret-0123456789abcdef0123456789
export CAUSELOOP_PUBLISH_KEY=cluster-publish-key
BIN=target/release
OUT=target/cluster-reshard
rm -rf "$OUT" && mkdir -p "$OUT"
DUR=${DUR:-4m}
MOVE_EVERY=${MOVE_EVERY:-2}
WIRE=${WIRE:-2}
WORKSPACES=100
PORTS=(6397 6398 6399)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
for p in "${PORTS[@]}"; do
  if redis-cli -p "$p" PING >/dev/null 2>&1; then
    echo "port $p is taken by another Redis; stop it first" >&2
    exit 1
  fi
  (cd "$OUT" && exec redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no \
    --cluster-enabled yes --cluster-config-file "nodes-$p.conf" --cluster-require-full-coverage no) >>"$OUT/redis.log" 2>&1 &
  PIDS+=($!)
done
for p in "${PORTS[@]}"; do
  for _ in $(seq 50); do [ "$(redis-cli -p "$p" PING 2>/dev/null)" = PONG ] && break; sleep 0.1; done
done
redis-cli --cluster create "${PORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
until redis-cli -p "${PORTS[0]}" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.2; done
BUS="redis-cluster://127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]}"
for i in 0 1 2; do
  "$BIN/causeloop-stream" --listen 127.0.0.1:$((4960 + i * 2)) --internal-listen 127.0.0.1:$((4961 + i * 2)) --shards 2 \
    --bus "$BUS" --bus-wire "$WIRE" >"$OUT/node$i.log" 2>&1 &
  PIDS+=($!)
done
sleep 1

ids=()
for p in "${PORTS[@]}"; do ids+=("$(redis-cli -p "$p" CLUSTER MYID)"); done
owner_of() { # slot -> index of the master that owns it (master 0's view)
  redis-cli -p "${PORTS[0]}" CLUSTER NODES | awk -v s="$1" '
    /master/ { for (i = 9; i <= NF; i++) { n = split($i, r, "-"); lo = r[1]; hi = (n == 2 ? r[2] : r[1]);
      if (s + 0 >= lo + 0 && s + 0 <= hi + 0) { split($2, a, "[:@]"); print a[2]; exit } } }'
}
(
  sleep 30 # the load tester's connect phase comes first
  n=0
  while :; do
    ws="lt_ws_$((n % WORKSPACES))"
    slot=$(redis-cli -p "${PORTS[0]}" CLUSTER KEYSLOT "causeloop:v1:ws:$ws")
    port=$(owner_of "$slot")
    for i in 0 1 2; do [ "${PORTS[$i]}" = "$port" ] && from=$i; done
    to=$(((from + 1 + n % 2) % 3))
    redis-cli -p "${PORTS[$to]}" CLUSTER SETSLOT "$slot" IMPORTING "${ids[$from]}" >/dev/null
    redis-cli -p "${PORTS[$from]}" CLUSTER SETSLOT "$slot" MIGRATING "${ids[$to]}" >/dev/null
    while :; do
      keys=$(redis-cli -p "${PORTS[$from]}" CLUSTER GETKEYSINSLOT "$slot" 10)
      [ -z "$keys" ] && break
      # shellcheck disable=SC2086
      redis-cli -p "${PORTS[$from]}" MIGRATE 127.0.0.1 "${PORTS[$to]}" "" 0 5000 KEYS $keys >/dev/null
    done
    for i in "$to" "$from" $(((3 - to - from) % 3)); do
      redis-cli -p "${PORTS[$i]}" CLUSTER SETSLOT "$slot" NODE "${ids[$to]}" >/dev/null
    done
    n=$((n + 1))
    echo "$n" >"$OUT/moves"
    sleep "$MOVE_EVERY"
  done
) &
MOVER=$!
PIDS+=($MOVER)

"$BIN/causeloop-loadtest" slow --url ws://127.0.0.1:4960 --url ws://127.0.0.1:4962 --url ws://127.0.0.1:4964 \
  --internal http://127.0.0.1:4961 --connections 3000 --workspaces $WORKSPACES --rate 5 --slow-fraction 0 --churn 30 --continuity \
  --processes 2 --source-ips 127.0.0.2-127.0.0.9 --duration "$DUR" --json "$OUT/soak.json" >"$OUT/loadtest.txt" 2>"$OUT/loadtest.log"
kill $MOVER 2>/dev/null || true

echo "slots moved: $(cat "$OUT/moves" 2>/dev/null || echo 0)"
for i in 0 1 2; do
  echo "node $i: $(curl -s 127.0.0.1:$((4961 + i * 2))/metrics |
    grep -E '^causeloop_(bus_(up|reconnects_total|messages_total|redirects_total|layout_reads_total|stream_reads_total|stream_gaps_total|records_lost_total)|stream_starts_total)' | tr '\n' ' ')"
done
python3 - "$OUT/soak.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); f = r["fanout"]
print(f"published {f['published_events']}, delivered {f['delivered_frames']}, lost {f['lost']}, reordered {f['reordered']}, repeated {f['repeated']}, stream.gap {f['gaps']}, churned {f['churned']}")
print(f"publish errors {f['publish_errors']}; connect failures {r['connect']['failures']}; closes {r['closes']}")
print(f"latency p50 {f['latency_us']['p50']} µs, p99 {f['latency_us']['p99']} µs; heartbeat lateness p99 {r['heartbeat_lateness_us']['p99']} µs")
PY
grep -h -E 'WARN|ERROR' "$OUT"/node*.log || echo "no WARN or ERROR lines"
