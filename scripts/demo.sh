#!/usr/bin/env bash
# The demo: builds the lab (cluster, internet and laptop network namespaces with real
# nginx, redis and a UDP echo server), runs `tpvpn up` in the laptop namespace, uses the
# cluster from there with curl and redis-cli, shows `tpvpn status`, runs `tpvpn down`
# and removes everything. Needs root (run with sudo); touches nothing outside the lab.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --workspace --release --locked
exec ./target/release/tpvpn-lab demo
