#!/usr/bin/env bash
# Builds the causeloop-stream image offline: the static binary with cargo first (musl target,
# musl-gcc for ring's C), then an image FROM scratch around it with podman (or docker).
#
# Usage: deploy/container/build.sh [TAG]        (default causeloop-stream:latest)
# Needs: rustup's x86_64-unknown-linux-musl target, musl-tools, and podman or docker. On Debian:
#   rustup target add x86_64-unknown-linux-musl && apt-get install -y musl-tools podman
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-causeloop-stream:latest}
CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc} \
  cargo build --release --locked --target x86_64-unknown-linux-musl --bin causeloop-stream
engine=$(command -v podman || command -v docker || true)
[ -n "$engine" ] || { echo "build.sh: neither podman nor docker is installed" >&2; exit 1; }
# Only the binary goes into the build context.
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/target/x86_64-unknown-linux-musl/release"
cp target/x86_64-unknown-linux-musl/release/causeloop-stream "$ctx/target/x86_64-unknown-linux-musl/release/"
strip "$ctx/target/x86_64-unknown-linux-musl/release/causeloop-stream" 2>/dev/null || true
format=()
[[ "$engine" == *podman ]] && format=(--format docker) # keeps the HEALTHCHECK
"$engine" build "${format[@]}" --build-arg BINARY=prebuilt -f deploy/container/Containerfile -t "$tag" "$ctx"
echo "built $tag with $(basename "$engine")"
