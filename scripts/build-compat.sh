#!/usr/bin/env bash
# Builds the binaries of the last release that speaks only tpvpn protocol v1, for the
# version-skew tests (an old client against this manager, this client against an old
# manager): target/compat/v1/{tpvpn,tpvpn-manager}. Built from this repository's own
# history, in the workspace's target directory (its dependencies are already built);
# skipped when they are there already.
set -euo pipefail
cd "$(dirname "$0")/.."

REV=eaf4e38  # main before protocol v2 (2026-11-22 session's last commit)
OUT=target/compat/v1
full=$(git rev-parse --verify "$REV^{commit}" 2>/dev/null) || {
  echo "build-compat: commit $REV is not in this clone (a shallow clone?); fetch the history: git fetch --unshallow" >&2
  exit 1
}
if [ -x "$OUT/tpvpn" ] && [ -x "$OUT/tpvpn-manager" ] && [ "$(cat "$OUT/rev" 2>/dev/null)" = "$full" ]; then
  exit 0
fi
src=target/compat/src-v1
rm -rf "$src" "$OUT"
mkdir -p "$src" "$OUT"
git archive "$full" | tar -x -C "$src"
target=$(pwd)/target
(cd "$src" && CARGO_TARGET_DIR="$target/compat/build" cargo build --locked -q -p tpvpn -p tpvpn-manager --bins)
cp "$target/compat/build/debug/tpvpn" "$target/compat/build/debug/tpvpn-manager" "$OUT/"
echo "$full" > "$OUT/rev"
rm -rf "$src" "$target/compat/build"
echo "build-compat: protocol v1 binaries of $REV in $OUT"
