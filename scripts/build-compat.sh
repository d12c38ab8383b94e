#!/usr/bin/env bash
# Builds the binaries of earlier releases for the version-skew tests, from this
# repository's own history:
# - target/compat/v1/{tpvpn,tpvpn-manager}: the last release that spoke only tpvpn
#   protocol v1 (an old client against this manager, this client against an old manager);
# - target/compat/v2/{tpvpn,tpvpn-manager,tpvpn-agent}: the last release that spoke
#   only up to v2 (no personal intercepts);
# - target/compat/mounts-ro/{tpvpn,tpvpn-manager,tpvpn-agent}: the last release whose
#   mounts were read-only only (no FEATURE_FILES_WRITE, --mount-readwrite).
# All are built in one target directory (shared dependencies are built once), which is
# removed afterwards; a release already built (its rev recorded) is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

target=$(pwd)/target
build() { # NAME REV BINS...
  local name=$1 rev=$2
  shift 2
  local out=target/compat/$name full
  full=$(git rev-parse --verify "$rev^{commit}" 2>/dev/null) || {
    echo "build-compat: commit $rev is not in this clone (a shallow clone?); fetch the history: git fetch --unshallow" >&2
    exit 1
  }
  local have=1
  for b in "$@"; do [ -x "$out/$b" ] || have=""; done
  if [ -n "$have" ] && [ "$(cat "$out/rev" 2>/dev/null)" = "$full" ]; then
    return 0
  fi
  local src=target/compat/src-$name
  rm -rf "$src" "$out"
  mkdir -p "$src" "$out"
  git archive "$full" | tar -x -C "$src"
  local pkgs=()
  for b in "$@"; do pkgs+=(-p "$b"); done
  (cd "$src" && CARGO_TARGET_DIR="$target/compat/build" cargo build --locked -q "${pkgs[@]}" --bins)
  for b in "$@"; do cp "$target/compat/build/debug/$b" "$out/"; done
  echo "$full" > "$out/rev"
  rm -rf "$src"
  echo "build-compat: $name binaries of $rev in $out"
}

build v1 eaf4e38 tpvpn tpvpn-manager  # main before protocol v2 (2026-11-22 session's last commit)
build v2 a69b455 tpvpn tpvpn-manager tpvpn-agent  # main before protocol v3 (personal intercepts)
build mounts-ro ca21247 tpvpn tpvpn-manager tpvpn-agent  # main before read-write mounts
rm -rf "$target/compat/build"
