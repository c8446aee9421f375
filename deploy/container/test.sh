#!/usr/bin/env bash
# Starts the image, reads its `listening` lines, connects a WebSocket through it and receives
# `connected`, publishes an event and receives it, checks the HEALTHCHECK, and stops it with
# SIGTERM (the drain exits 0). Everything on loopback; the container is removed at the end.
#
# Usage: deploy/container/test.sh [TAG]     (default causeloop-stream:latest; build.sh makes it)
# Needs: podman (or docker) and Node.js 20+ (its WebSocket client).
set -euo pipefail
tag=${1:-causeloop-stream:latest}
engine=$(command -v podman || command -v docker || true)
[ -n "$engine" ] || { echo "test.sh: neither podman nor docker is installed" >&2; exit 1; }
run_flags=()
# This machine's podman runs containers with runc only, under the process's file limit.
[[ "$engine" == *podman ]] && run_flags=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
secret=container-test-secret-$RANDOM$RANDOM-0123456789
key=container-test-publish-key-$RANDOM
cid=$("$engine" run -d "${run_flags[@]}" -p 127.0.0.1::4000 -p 127.0.0.1::4001 \
  -e CAUSELOOP_JWT_HS256_SECRET="$secret" -e CAUSELOOP_PUBLISH_KEY="$key" "$tag")
cleanup() { "$engine" rm -f "$cid" >/dev/null 2>&1 || true; }
trap cleanup EXIT
fail() { echo "test.sh: FAILED: $*" >&2; "$engine" logs "$cid" >&2 || true; exit 1; }

# The `listening` lines, within 20 s.
for _ in $(seq 200); do
  out=$("$engine" logs "$cid" 2>/dev/null || true)
  grep -q '^listening internal=' <<<"$out" && break
  sleep 0.1
done
grep -q '^listening public=0.0.0.0:4000$' <<<"$out" || fail "no 'listening public=' line"
grep -q '^listening internal=0.0.0.0:4001$' <<<"$out" || fail "no 'listening internal=' line"
public=$("$engine" port "$cid" 4000/tcp | head -1)
internal=$("$engine" port "$cid" 4001/tcp | head -1)
echo "container $cid: public $public, internal $internal"

# A token minted by the image's own binary, with the container's secret.
token=$("$engine" exec "$cid" /causeloop-stream token --workspace ws_container --user usr_1)

# A WebSocket through the container: `connected`, then the event published meanwhile.
node --experimental-websocket -e '
  const [url, pub, key] = process.argv.slice(1);
  const ws = new WebSocket(url);
  const done = setTimeout(() => { console.error("timed out"); process.exit(1); }, 15000);
  ws.onmessage = async (m) => {
    const f = JSON.parse(m.data);
    console.log("frame:", f.type);
    if (f.type === "connected") {
      const r = await fetch(pub, { method: "POST", headers: { authorization: "Bearer " + key,
        "content-type": "application/json" }, body: JSON.stringify({ workspace_id: "ws_container",
        type: "issue.created", payload: { id: "iss_1", title: "through the container" } }) });
      if (r.status !== 202) { console.error("publish:", r.status); process.exit(1); }
    } else if (f.type === "issue.created") {
      if (f.payload.title !== "through the container") process.exit(1);
      clearTimeout(done); ws.close(); process.exit(0);
    }
  };
  ws.onerror = (e) => { console.error("error", e.message); process.exit(1); };
' "ws://$public/v1/stream?token=$token&workspace=ws_container" "http://$internal/v1/publish" "$key" \
  || fail "no connected frame and event through the container"

# The image's HEALTHCHECK (podman runs it on demand; docker on its own schedule).
if [[ "$engine" == *podman ]]; then
  "$engine" healthcheck run "$cid" || fail "HEALTHCHECK failed"
fi

# SIGTERM drains and exits 0.
"$engine" stop -t 20 "$cid" >/dev/null
code=$("$engine" inspect -f '{{.State.ExitCode}}' "$cid")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
user=$("$engine" inspect -f '{{.Config.User}}' "$tag")
[ "$user" = "65532:65532" ] || fail "image user $user, not 65532:65532"
echo "test.sh: ok (connected and an event through the container, healthcheck, drain exit 0, user $user)"
