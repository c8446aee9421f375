#!/usr/bin/env bash
# What wire format 2 costs Redis: CPU per event of the publish function (`causeloop_publish` /
# `causeloop_spublish`: position, history stream, publish) against a plain PUBLISH / SPUBLISH
# of the same message, measured in the same run on one Redis and on a three-master Redis
# Cluster, each channel with three subscribers (three nodes). Also the memory of the history:
# bytes per event of a full stream (--history-size 1000) and of a workspace's position.
#
# CPU comes two ways: Redis's own per-command time (INFO commandstats, usec_per_call) and the
# Redis process's CPU time (/proc/PID/stat) over the whole run divided by the events, which
# includes the network work and the delivery to the subscribers.
#
# Usage: loadtest/scripts/redis-cost.sh   (N=100000 events per measurement; needs redis-server,
#        redis-cli, redis-benchmark)
# Output: markdown on stdout; logs in target/redis-cost/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=target/redis-cost
rm -rf "$OUT" && mkdir -p "$OUT"
N=${N:-100000}
SINGLE=6421
CPORTS=(6422 6423 6424)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
for p in $SINGLE "${CPORTS[@]}"; do
  if redis-cli -p "$p" PING >/dev/null 2>&1; then
    echo "port $p is taken by another Redis; stop it first" >&2
    exit 1
  fi
done
start() { # port [args...]
  local p=$1
  shift
  mkdir -p "$OUT/data-$p"
  (cd "$OUT/data-$p" && exec redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no "$@") >>"$OUT/redis.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$OUT/pid-$p"
  for _ in $(seq 50); do [ "$(redis-cli -p "$p" PING 2>/dev/null)" = PONG ] && break; sleep 0.1; done
}
start $SINGLE
for p in "${CPORTS[@]}"; do start "$p" --cluster-enabled yes --cluster-config-file "nodes-$p.conf"; done
redis-cli --cluster create "${CPORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
until redis-cli -p "${CPORTS[0]}" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.2; done

WS=ws_bench
CHANNEL="causeloop:v1:ws:$WS"
BASE="{$CHANNEL}"
# The seed's `issue.created` sample, as a publisher stamps it.
EVENT='{"type":"issue.created","ts":1764373560123,"payload":{"id":"iss_123","title":"Checkout fails on Safari","severity":"high","service":"web-checkout","count":42}}'
MESSAGE='{"v":1'"${EVENT#\{}"
SLOT=$(redis-cli -p "${CPORTS[0]}" CLUSTER KEYSLOT "$CHANNEL")
MASTER=$(redis-cli -p "${CPORTS[0]}" CLUSTER NODES | awk -v s="$SLOT" '
  /master/ { for (i = 9; i <= NF; i++) { n = split($i, r, "-"); lo = r[1]; hi = (n == 2 ? r[2] : r[1]);
    if (s + 0 >= lo + 0 && s + 0 <= hi + 0) { split($2, a, "[:@]"); print a[2]; exit } } }')
for p in $SINGLE "${CPORTS[@]}"; do
  redis-cli -p "$p" FUNCTION LOAD REPLACE "$(cat src/bus/cluster/causeloop.lua)" >/dev/null
done

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$(cat "$OUT/pid-$1")/stat"; }
HZ=$(getconf CLK_TCK)
# measure PORT LABEL COMMAND... : per-command µs (commandstats) and process CPU µs per event
measure() {
  local p=$1 label=$2 stat=$3
  shift 3
  redis-cli -p "$p" CONFIG RESETSTAT >/dev/null
  local before
  before=$(cpu_ticks "$p")
  redis-benchmark -p "$p" -n "$N" -c 4 -q "$@" >>"$OUT/bench.log" 2>&1
  local after
  after=$(cpu_ticks "$p")
  local per_call
  per_call=$(redis-cli -p "$p" INFO commandstats | tr -d '\r' | awk -F'[=,]' -v k="cmdstat_$stat:calls" '$1 == k { for (i = 1; i <= NF; i++) if ($i == "usec_per_call") print $(i + 1) }')
  local proc
  proc=$(awk -v a="$before" -v b="$after" -v n="$N" -v hz="$HZ" 'BEGIN { printf "%.2f", (b - a) * 1e6 / hz / n }')
  echo "| $label | $per_call | $proc |"
}

subscribe() { # port command
  for _ in 1 2 3; do
    redis-cli -p "$1" "$2" "$CHANNEL" >/dev/null 2>&1 &
    PIDS+=($!)
  done
  sleep 0.5
}
subscribe $SINGLE SUBSCRIBE
subscribe "$MASTER" SSUBSCRIBE

echo "Redis CPU per event, $N events of the seed's issue.created sample, 3 subscribers per channel ($(date -u +%F), $(nproc) vCPU):"
echo
echo "| setup | Redis µs per call (commandstats) | Redis process CPU µs per event |"
echo "|---|---|---|"
measure $SINGLE "one Redis, PUBLISH (wire 1)" publish PUBLISH "$CHANNEL" "$MESSAGE"
measure $SINGLE "one Redis, causeloop_publish (wire 2)" fcall FCALL causeloop_publish 2 "$BASE:meta" "$BASE:history" "$CHANNEL" 1000 120000 "$EVENT"
measure "$MASTER" "Redis Cluster master, SPUBLISH (wire 1)" spublish SPUBLISH "$CHANNEL" "$MESSAGE"
measure "$MASTER" "Redis Cluster master, causeloop_spublish (wire 2)" fcall FCALL causeloop_spublish 2 "$BASE:meta" "$BASE:history" "$CHANNEL" 1000 120000 "$EVENT"

echo
len=$(redis-cli -p $SINGLE XLEN "$BASE:history")
hist=$(redis-cli -p $SINGLE MEMORY USAGE "$BASE:history" SAMPLES 0)
meta=$(redis-cli -p $SINGLE MEMORY USAGE "$BASE:meta")
echo "History memory: a full stream of $len events takes $hist bytes ($((hist / len)) bytes per event of a $(printf %s "$EVENT" | wc -c)-byte event); a workspace's position (the meta hash) $meta bytes."
