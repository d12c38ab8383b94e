#!/usr/bin/env bash
# Type-checks the client (`tpvpn` and every crate it uses) for macOS on Intel and Apple
# silicon, so that Linux-only code cannot reach a portable path unnoticed. The manager
# and the agent are Linux-only and not part of it. Installs what it needs: the darwin
# standard libraries (rustup) and zig (PyPI's ziglang) as the C compiler for ring.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(x86_64-apple-darwin aarch64-apple-darwin)
if ! timeout 600 rustup target add "${targets[@]}"; then
  echo "WARNING: cannot install the macOS standard libraries (rustup target add): the macOS check is SKIPPED" >&2
  exit 0
fi
# zig from PyPI, in a virtual environment of its own (Debian's python refuses global pip installs).
venv=target/macos-tools
if ! "$venv/bin/python3" -m ziglang version >/dev/null 2>&1; then
  python3 -m venv "$venv" || { apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$venv"; }
  "$venv/bin/pip" install --quiet ziglang
fi
export ZIG_PYTHON="$PWD/$venv/bin/python3"
for t in "${targets[@]}"; do
  u=${t//-/_}
  env ZIG_TARGET="${t%%-*}-macos" "CC_$u=$PWD/scripts/zig-cc.sh" "AR_$u=$PWD/scripts/zig-ar.sh" \
    cargo check --locked -p tpvpn --target "$t"
done
echo "macOS: the client type-checks for ${targets[*]}"
