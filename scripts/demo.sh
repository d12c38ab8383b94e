#!/usr/bin/env bash
# The demo: builds the lab (cluster, internet and laptop network namespaces with real
# nginx, redis and a UDP echo server), runs `tpvpn up` in the laptop namespace, uses the
# cluster from there with curl and redis-cli, shows `tpvpn status`, runs `tpvpn down`
# and removes everything. Needs root; touches nothing outside the lab.
set -euo pipefail
cd "$(dirname "$0")/.."

# As root, or as a user who may sudo (it runs itself through sudo, keeping the user's
# Rust toolchain on PATH).
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
  exec sudo env "PATH=$PATH" "HOME=$HOME" "CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}" \
    "RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}" "$0" "$@"
fi
./scripts/install-deps.sh
cargo build --workspace --release --locked
exec ./target/release/tpvpn-lab demo
