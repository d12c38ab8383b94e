#!/usr/bin/env bash
# The whole test suite: unit tests, end-to-end tests in the network-namespace lab
# (they need root; run with sudo), the fuzz targets' invariants over a generated
# corpus, and clippy. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "WARNING: not root: the end-to-end lab tests will SKIP. Run: sudo ./scripts/test.sh" >&2
fi

cargo build --workspace --all-targets --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
(cd fuzz && cargo test --locked --no-default-features)
cargo nextest run --workspace --locked
