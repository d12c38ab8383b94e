#!/usr/bin/env bash
# `ar` for macOS targets from Linux (see zig-cc.sh).
exec "${ZIG_PYTHON:-python3}" -m ziglang ar "$@"
