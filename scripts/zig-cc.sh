#!/usr/bin/env bash
# A C compiler for macOS targets from Linux: zig (PyPI's ziglang) as `cc`, for the C
# code of dependencies (ring) when the client is checked for macOS. cc-rs passes
# `-arch` and `--target=` flags of Apple's clang that `zig cc -target` does not take.
set -euo pipefail
args=()
skip=0
for a in "$@"; do
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  case "$a" in
    -arch) skip=1 ;;
    --target=*) ;;
    *) args+=("$a") ;;
  esac
done
exec "${ZIG_PYTHON:-python3}" -m ziglang cc -target "${ZIG_TARGET:?set ZIG_TARGET, e.g. x86_64-macos}" "${args[@]}"
