#!/usr/bin/env bash
# The end-to-end benchmark: tpvpn against the direct veth path in the lab, one table.
# Needs root (run with sudo); touches nothing outside the lab's namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --workspace --release --locked
exec ./target/release/tpvpn-bench
