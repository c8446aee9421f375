#!/usr/bin/env bash
# The soak run behind docs/reliability.md.
#
# Starts causeloop-stream (two shards, a small outbound limit so stalled readers are found and
# closed 1008 within seconds), then runs causeloop-loadtest's slow scenario with churn for DUR:
# 4,000 subscribers over 40 workspaces, 5 events/s per workspace with 256 bytes of padding
# (20,000 frames/s, well inside what this machine delivers, so latency means something), 1% of
# subscribers that stall (every 90 s each looks at what it was sent; once the server has closed it
# it reconnects and stalls again), and 40 connections a second closed with a close handshake
# and reopened. Every reconnect uses the subscriber's first token and carries its sequence on
# (--continuity), so an event published while it was away and not given back counts as lost.
# The server's RSS and open files are sampled every second. At the end the server is drained
# with SIGTERM and the summary is printed as markdown: RSS and descriptors over time, frames
# lost, repeated and told of (stream.gap), failures, and every server log line at WARN or above.
#
# Usage: loadtest/scripts/soak.sh        (DUR=30m by default; DUR=2m for a quick look)
# Output: markdown on stdout; JSON, HTML report and the server log in target/soak/.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --workspace -q
BIN=target/release
OUT=target/soak
mkdir -p "$OUT"
export CAUSELOOP_JWT_HS256_SECRET=soak-secret-0123456789abcdef0123456789
export CAUSELOOP_PUBLISH_KEY=soak-publish-key
DUR=${DUR:-30m}
PUB=127.0.0.1:4710
INT=127.0.0.1:4711

"$BIN/causeloop-stream" --listen $PUB --internal-listen $INT --shards 2 \
  --max-outbound-bytes 65536 --socket-send-buffer 16384 --log-format json >"$OUT/server.log" 2>&1 &
SPID=$!
trap 'kill $SPID 2>/dev/null || true' EXIT
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4710) 2>/dev/null && break; sleep 0.1; done

"$BIN/causeloop-loadtest" slow --url ws://$PUB --internal http://$INT --connections 4000 --workspaces 40 \
  --rate 5 --pad 256 --slow-fraction 0.01 --churn 40 --continuity --processes 2 --source-ips 127.0.0.2-127.0.0.9 \
  --duration "$DUR" --server-pid "$SPID" --json "$OUT/soak.json" --report "$OUT/soak.html" \
  >"$OUT/loadtest.txt" 2>"$OUT/loadtest.log"

kill -TERM "$SPID"
wait "$SPID"
echo "server exit status: $?"
trap - EXIT

python3 - "$OUT/soak.json" "$OUT/server.log" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
series = [p for p in r["series"] if p.get("server_rss_bytes")]
def at(t):  # the sample nearest t seconds
    return min(series, key=lambda p: abs(p["t_s"] - t))
end = series[-1]["t_s"]
warm = min(60, end // 2)
print(f"command: `{r['command']}`\n\nmachine: {r['machine']}; date: {r['date']}\n")
print("| second | open connections | server RSS MiB | server open files | delivered frames/s | p99 µs |")
print("|---|---|---|---|---|---|")
marks = sorted({warm, end // 4, end // 2, 3 * end // 4, end})
for t in marks:
    p = at(t)
    print(f"| {p['t_s']} | {p['open']} | {p['server_rss_bytes']/2**20:.1f} | {p['server_open_files']} | {p['delivered_per_s']} | {p['p99_us']} |")
steady = [p for p in series if p["t_s"] >= warm]
rss = [p["server_rss_bytes"] for p in steady]
fds = [p["server_open_files"] for p in steady]
print(f"\nfrom second {warm} on: RSS {min(rss)/2**20:.1f}–{max(rss)/2**20:.1f} MiB, open files {min(fds)}–{max(fds)}")
f = r["fanout"]
print(f"published {f['published_events']}, delivered {f['delivered_frames']}, lost {f['lost']}, reordered {f['reordered']}, churned {f['churned']}, repeated after a reconnect {f.get('repeated', 0)}, stream.gap {f.get('gaps', 0)}")
print(f"connected {r['connect']['connected']} (attempts {r['connect']['attempts']}), failures {r['connect']['failures']}")
print(f"closes to readers {r['closes']}, closes to stalled readers {r['slow_closes']}, publish errors {f['publish_errors']}")
l = f['latency_us']
print(f"latency p50 {l['p50']} µs, p99 {l['p99']} µs, p99.9 {l['p999']} µs, max {l['max']} µs")
print(f"heartbeat lateness p99 {r['heartbeat_lateness_us']['p99']} µs")
levels = {}
warn = []
for line in open(sys.argv[2]):
    if line.startswith("listening "):
        continue  # the address banner on stdout, not a log line
    try:
        e = json.loads(line)
    except ValueError:
        warn.append(line.strip()); continue
    lvl = e.get("level", "?")
    levels[lvl] = levels.get(lvl, 0) + 1
    if lvl in ("WARN", "ERROR"):
        warn.append(line.strip())
print(f"server log lines by level: {levels}")
print(f"WARN/ERROR lines: {len(warn)}")
for w in warn[:20]:
    print("    " + w)
PY
