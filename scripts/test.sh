#!/usr/bin/env bash
# The whole test suite: unit tests, end-to-end tests in the network-namespace lab
# (they need root), version-skew tests against the previous release
# (built from this repository's history), the fuzz targets' invariants over a
# generated corpus, and clippy. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

# As root, or as a user who may sudo (it runs itself through sudo, keeping the user's
# Rust toolchain on PATH).
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
  exec sudo env "PATH=$PATH" "HOME=$HOME" "CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}" \
    "RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}" "$0" "$@"
fi
./scripts/install-deps.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "WARNING: not root: the end-to-end lab tests will SKIP. Run it as root" >&2
fi

cargo fmt --all --check
cargo build --workspace --all-targets --locked
# The previous release's binaries (protocol v1), for the version-skew tests.
./scripts/build-compat.sh
cargo clippy --workspace --all-targets --locked -- -D warnings
# The client for macOS (type-checked; nothing runs on a Mac here).
./scripts/check-macos.sh
(cd fuzz && cargo test --locked --no-default-features)
cargo nextest run --workspace --locked
