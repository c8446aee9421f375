#!/usr/bin/env bash
# Reproduces the tables of docs/performance.md.
#
# Builds the release binaries, then for every row starts a server (causeloop-stream, or the
# load tester's bare-send floor server), runs causeloop-loadtest against it with --server-pid,
# stops it, and prints one markdown table row. Floor and server rows of one table are measured
# back to back in the same run, so their ratio is meaningful on a noisy machine.
#
# Usage: loadtest/scripts/perf.sh [SECTION...]   sections: frame bursts scale shards connect
#        history compression tls compression-pinned (default: all but compression-pinned).
#        compression-pinned: the server on CPU 0 and the load tester on CPU 1, so that the load
#        tester's inflating does not share the server's core; OTHER_BIN=path/to/causeloop-stream
#        adds rows for another build (an A/B in one run). DUR=3s for a quick smoke run.
# Output: markdown on stdout; JSON and HTML reports in target/perf/.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --workspace -q
BIN=target/release
OUT=target/perf
mkdir -p "$OUT"
export CAUSELOOP_JWT_HS256_SECRET=perf-secret-0123456789abcdef0123456789
export CAUSELOOP_PUBLISH_KEY=perf-publish-key
DUR=${DUR:-10s}
SECTIONS=${*:-frame bursts scale shards connect history compression tls}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
# Client sockets end in TIME_WAIT on the load tester's side; spreading them over eight source
# addresses keeps back-to-back runs from searching a crowded port range.
SRC=127.0.0.2-127.0.0.9
PUB=127.0.0.1:4700
INT=127.0.0.1:4701

# The TLS rows' throwaway certificate (loadtest/scripts/tls-cert.sh).
TLS_DIR=$OUT/tls

start() { # kind (floor, server, pinned: shard i on CPU i, nohistory: --history-size 0, tls) shards
  if [ "$1" = floor ]; then
    "$BIN/causeloop-loadtest" floor-server --listen $PUB --internal-listen $INT >/dev/null 2>&1 &
  elif [ "$1" = pinned ]; then
    "$BIN/causeloop-stream" --listen $PUB --internal-listen $INT --shards "$2" \
      --cpu-affinity "0-$(($2 - 1))" >/dev/null 2>&1 &
  elif [ "$1" = tls ]; then
    "$BIN/causeloop-stream" --listen $PUB --internal-listen $INT --shards "$2" \
      --tls-cert "$TLS_DIR/cert.pem" --tls-key "$TLS_DIR/key.pem" >/dev/null 2>&1 &
  elif [ "$1" = nohistory ]; then
    "$BIN/causeloop-stream" --listen $PUB --internal-listen $INT --shards "$2" \
      --history-size 0 >/dev/null 2>&1 &
  else
    "$BIN/causeloop-stream" --listen $PUB --internal-listen $INT --shards "$2" >/dev/null 2>&1 &
  fi
  SPID=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4700) 2>/dev/null && return; sleep 0.1; done
  echo "server did not start" >&2; exit 1
}
stop() { kill "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null || true; sleep 0.5; }

field() { # json-file python-expression
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); v=$2; print('n/a' if v is None else (f'{v:.0f}' if isinstance(v,float) else v))" "$1"
}

url() { # kind: the stream URL (wss:// for the tls kind, with the certificate's authority)
  if [ "$1" = tls ]; then echo "wss://localhost:${PUB#*:} --ca-file $TLS_DIR/ca.pem"; else echo "ws://$PUB"; fi
}

fanout_row() { # label kind shards conns rate tick processes; LT_EXTRA: more load tester flags
  local name="fanout-$2-s$3-c$4-r$5-t$6${LT_NAME:-}"
  start "$2" "$3"
  # shellcheck disable=SC2086
  "$BIN/causeloop-loadtest" fanout --url $(url "$2") --internal http://$INT --connections "$4" --workspaces 20 \
    --rate "$5" --tick "$6" --processes "$7" --source-ips $SRC --duration "$DUR" --server-pid "$SPID" \
    ${LT_EXTRA:-} --json "$OUT/$name.json" --report "$OUT/$name.html" >/dev/null 2>"$OUT/$name.log"
  stop
  local f="$OUT/$name.json"
  echo "| $1 | $3 | $4 | $(field "$f" "r['fanout']['delivered_per_s']") | $(field "$f" "r['server']['cpu_ns_per_frame']") | $(field "$f" "r['fanout']['latency_us']['p50']") | $(field "$f" "r['fanout']['latency_us']['p99']") | $(field "$f" "r['fanout']['lost']") | $(field "$f" "r['loadtest']['worker_max_core_share']*100") |"
}

connect_row() { # label kind shards conns rate processes hold
  local name="connect-$2-s$3-c$4"
  start "$2" "$3"
  "$BIN/causeloop-loadtest" connect --url $(url "$2") --connections "$4" --connect-rate "$5" --processes "$6" --source-ips $SRC \
    --duration "$7" --server-pid "$SPID" --json "$OUT/$name.json" --report "$OUT/$name.html" >/dev/null 2>"$OUT/$name.log"
  stop
  local f="$OUT/$name.json"
  echo "| $1 | $3 | $4 | $(field "$f" "r['connect']['connected']") | $(field "$f" "r['server']['cpu_ns_per_connection']") | $(field "$f" "r['server']['rss_bytes_per_connection']") | $(field "$f" "r['connect']['latency_us']['p99']") | $(field "$f" "r['heartbeat_lateness_us']['p99']") |"
}

if want frame; then
echo "### Fan-out, one frame per send (2,000 connections, 20 workspaces, 20 events/s per workspace)"
echo
echo "| target | shards | connections | delivered/s | server CPU ns/frame | p50 µs | p99 µs | lost | load tester % core |"
echo "|---|---|---|---|---|---|---|---|---|"
for rep in 1 2; do
  fanout_row "floor (bare send)" floor 1 2000 20 10ms 1
  fanout_row "causeloop-stream" server 1 2000 20 10ms 1
  fanout_row "causeloop-stream" server 2 2000 20 10ms 1
done
echo
fi
if want bursts; then
echo "### Fan-out in bursts (2,000 connections, 100 events/s per workspace published once per tick)"
echo
echo "| target | shards | connections | delivered/s | server CPU ns/frame | p50 µs | p99 µs | lost | load tester % core |"
echo "|---|---|---|---|---|---|---|---|---|"
fanout_row "floor, tick 1s" floor 1 2000 100 1s 1
fanout_row "causeloop-stream, tick 200ms" server 1 2000 100 200ms 1
fanout_row "causeloop-stream, tick 1s" server 1 2000 100 1s 1
fanout_row "causeloop-stream, tick 1s" server 2 2000 100 1s 1
echo
fi
if want scale; then
echo "### Fan-out by connection count (delivered rate held near 40,000 frames/s)"
echo
echo "| target | shards | connections | delivered/s | server CPU ns/frame | p50 µs | p99 µs | lost | load tester % core |"
echo "|---|---|---|---|---|---|---|---|---|"
fanout_row "floor (bare send)" floor 1 10000 4 10ms 2
fanout_row "causeloop-stream" server 1 10000 4 10ms 2
fanout_row "causeloop-stream" server 2 10000 4 10ms 2
fanout_row "floor (bare send)" floor 1 19000 2 10ms 2
fanout_row "causeloop-stream" server 1 19000 2 10ms 2
fanout_row "causeloop-stream" server 2 19000 2 10ms 2
echo
fi
if want shards; then
echo "### Throughput by shards (2,000 connections, 2,000 events/s per workspace in 100 ms bursts: more than the machine can deliver)"
echo
echo "| target | shards | connections | delivered/s | server CPU ns/frame | p50 µs | p99 µs | lost | load tester % core |"
echo "|---|---|---|---|---|---|---|---|---|"
fanout_row "causeloop-stream" server 1 2000 2000 100ms 2
fanout_row "causeloop-stream" server 2 2000 2000 100ms 2
echo
fi
if want connect; then
echo "### Connections (ramped at 5,000/s, then held)"
echo
echo "| target | shards | connections | connected | server CPU ns/connection | RSS bytes/connection | connect p99 µs | heartbeat lateness p99 µs |"
echo "|---|---|---|---|---|---|---|---|"
connect_row "floor (bare send)" floor 1 10000 5000 2 5s
connect_row "causeloop-stream" server 1 10000 5000 2 5s
connect_row "causeloop-stream" server 2 10000 5000 2 5s
connect_row "causeloop-stream, --cpu-affinity" pinned 2 10000 5000 2 5s
connect_row "causeloop-stream, idle 15k" server 2 15000 5000 2 12s
connect_row "causeloop-stream, 19k held" server 2 19000 4000 2 20s
fi
if want history; then
echo "### History on and off (2,000 connections, 20 workspaces; one frame per send, then bursts)"
echo
echo "| target | shards | connections | delivered/s | server CPU ns/frame | p50 µs | p99 µs | lost | load tester % core |"
echo "|---|---|---|---|---|---|---|---|---|"
# Each pair in both orders, so that whatever the second run of a pair inherits (sockets in
# TIME_WAIT, a warmer machine) falls on each side once.
for order in "nohistory server" "server nohistory"; do
  for kind in $order; do
    label=$([ "$kind" = server ] && echo "history on" || echo "--history-size 0")
    fanout_row "$label, 20/s per workspace" "$kind" 1 2000 20 10ms 1
  done
  for kind in $order; do
    label=$([ "$kind" = server ] && echo "history on" || echo "--history-size 0")
    fanout_row "$label, bursts, tick 200ms" "$kind" 1 2000 100 200ms 1
  done
done
echo
echo "| target | shards | connections | connected | server CPU ns/connection | RSS bytes/connection | connect p99 µs | heartbeat lateness p99 µs |"
echo "|---|---|---|---|---|---|---|---|"
connect_row "--history-size 0, idle 15k" nohistory 2 15000 5000 2 12s
connect_row "history on, idle 15k" server 2 15000 5000 2 12s
echo
fi
if want compression; then
echo "### permessage-deflate on and off (2,000 connections, 20 workspaces, events padded with 200 bytes of words)"
echo
echo "| subscribers | shards | connections | delivered/s | server CPU ns/frame | bytes received per frame | p50 µs | p99 µs | lost | load tester % core |"
echo "|---|---|---|---|---|---|---|---|---|---|"
comp_row() { # label lt-extra rate tick
  LT_EXTRA="--pad 200 $2" LT_NAME="-pad$([ -n "$2" ] && echo -deflate)" fanout_row "$1" server 1 2000 "$3" "$4" 1 >/dev/null
  local f="$OUT/fanout-server-s1-c2000-r$3-t$4-pad$([ -n "$2" ] && echo -deflate).json"
  echo "| $1 | 1 | 2000 | $(field "$f" "r['fanout']['delivered_per_s']") | $(field "$f" "r['server']['cpu_ns_per_frame']") | $(field "$f" "r['fanout']['bytes_received']/max(r['fanout']['delivered_frames'],1)") | $(field "$f" "r['fanout']['latency_us']['p50']") | $(field "$f" "r['fanout']['latency_us']['p99']") | $(field "$f" "r['fanout']['lost']") | $(field "$f" "r['loadtest']['worker_max_core_share']*100") |"
}
for order in "plain deflate" "deflate plain"; do
  for k in $order; do
    extra=$([ "$k" = deflate ] && echo "--compression" || echo "")
    label=$([ "$k" = deflate ] && echo "offer permessage-deflate" || echo "offer nothing")
    comp_row "$label, 20/s per workspace" "$extra" 20 10ms
    comp_row "$label, bursts, tick 200ms" "$extra" 100 200ms
  done
done
echo
fi
if want tls; then
loadtest/scripts/tls-cert.sh "$TLS_DIR" >/dev/null
echo "### TLS and plain (2,000 connections, 20 workspaces; one frame per send, then bursts)"
echo
echo "| target | shards | connections | delivered/s | server CPU ns/frame | p50 µs | p99 µs | lost | load tester % core |"
echo "|---|---|---|---|---|---|---|---|---|"
for order in "server tls" "tls server"; do
  for kind in $order; do
    label=$([ "$kind" = tls ] && echo "wss:// (TLS 1.3)" || echo "ws://")
    fanout_row "$label, 20/s per workspace" "$kind" 1 2000 20 10ms 1
  done
  for kind in $order; do
    label=$([ "$kind" = tls ] && echo "wss:// (TLS 1.3)" || echo "ws://")
    fanout_row "$label, bursts, tick 200ms" "$kind" 1 2000 100 200ms 1
  done
done
echo
echo "| target | shards | connections | connected | server CPU ns/connection | RSS bytes/connection | connect p99 µs | heartbeat lateness p99 µs |"
echo "|---|---|---|---|---|---|---|---|"
connect_row "ws://, idle 15k" server 2 15000 5000 2 12s
connect_row "wss://, idle 15k" tls 2 15000 5000 2 12s
echo
fi
if want compression-pinned; then
echo "### permessage-deflate in bursts, server pinned to CPU 0, load tester to CPU 1 (2,000 connections, 20 workspaces, 100 events/s per workspace every 200 ms, padded with 200 bytes of words)"
echo
echo "| server | compression | delivered/s | server CPU ns/frame | bytes received per frame | lost | load tester % core |"
echo "|---|---|---|---|---|---|---|"
pinned_row() { # label binary lt-extra
  taskset -c 0 "$2" --listen $PUB --internal-listen $INT --shards 1 >/dev/null 2>&1 &
  SPID=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4700) 2>/dev/null && break; sleep 0.1; done
  local f="$OUT/pinned.json"
  # shellcheck disable=SC2086
  taskset -c 1 "$BIN/causeloop-loadtest" fanout --url ws://$PUB --internal http://$INT --connections 2000 --workspaces 20 \
    --rate 100 --tick 200ms --processes 1 --source-ips $SRC --duration "$DUR" --server-pid "$SPID" --pad 200 $3 \
    --json "$f" >/dev/null 2>"$OUT/pinned.log"
  stop
  echo "| $1 | $([ -n "$3" ] && echo on || echo off) | $(field "$f" "r['fanout']['delivered_per_s']") | $(field "$f" "r['server']['cpu_ns_per_frame']") | $(field "$f" "r['fanout']['bytes_received']/max(r['fanout']['delivered_frames'],1)") | $(field "$f" "r['fanout']['lost']") | $(field "$f" "r['loadtest']['worker_max_core_share']*100") |"
}
for rep in 1 2 3; do
  pinned_row "this build" "$BIN/causeloop-stream" ""
  pinned_row "this build" "$BIN/causeloop-stream" "--compression"
  if [ -n "${OTHER_BIN:-}" ]; then
    pinned_row "$OTHER_BIN" "$OTHER_BIN" "--compression"
  fi
done
echo
fi
