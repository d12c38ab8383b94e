#!/usr/bin/env bash
# The end-to-end benchmark: tpvpn against the direct veth path, wireguard-go and boringtun
# in the lab (throughput, ping-pong and connect latency), one table per section.
# Needs root (run with sudo); touches nothing outside the lab's namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${CARGO_TARGET_DIR:-target}"
TOOLS="$TARGET/tools"
BORINGTUN_VERSION=0.7.1

./scripts/install-deps.sh --bench
if [ "$("$TOOLS/bin/boringtun-cli" --version 2>/dev/null)" != "boringtun $BORINGTUN_VERSION" ]; then
  # Built in a temporary directory, installed beside the workspace's build output.
  env -u CARGO_TARGET_DIR cargo install boringtun-cli --version "$BORINGTUN_VERSION" --locked --root "$TOOLS"
fi
cargo build --workspace --release --locked
PATH="$(realpath "$TOOLS")/bin:$PATH" exec "$TARGET/release/tpvpn-bench"
