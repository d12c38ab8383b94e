#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmarks need on a Debian machine:
# Debian packages (real servers and clients for the lab) and cargo-nextest.
# With --bench, for the benchmark: also the peers it compares tpvpn with (wireguard-go,
# and wireguard-tools to configure it; scripts/bench.sh installs boringtun-cli itself),
# and no cargo-nextest.
# Package installs do not start their services (nginx, redis, dnsmasq): the lab runs
# its own instances inside network namespaces.
set -euo pipefail

PKGS=(iproute2 nginx redis-server redis-tools curl dnsutils iperf3 dnsmasq-base procps dbus-daemon systemd nftables
  python3-grpcio python3-websockets python3-h2
  containerd runc containernetworking-plugins busybox-static protobuf-compiler)
# kubectl, to check the API stand-in against a real client: Debian's (kubernetes-client)
# unless the machine already has one.
command -v kubectl >/dev/null 2>&1 || PKGS+=(kubernetes-client)
BENCH=""
case "${1:-}" in
  "") ;;
  --bench) BENCH=1; PKGS+=(wireguard-go wireguard-tools dnsperf wrk) ;;
  *) echo "usage: $0 [--bench]" >&2; exit 2 ;;
esac

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  # Keep apt from starting nginx/redis on this machine: a policy-rc.d that denies
  # service starts, only for the duration of the install and only if none exists.
  added_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    added_policy=1
  fi
  trap '[ -n "$added_policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# systemd-resolved for the lab's `--dns-mode resolved` test: Debian's package unpacked,
# not installed (installing it would take over this machine's /etc/resolv.conf). The
# lab runs it inside its laptop namespace only.
RESOLVED_DIR=/var/cache/tpvpn-lab/systemd-resolved
if [ -z "$BENCH" ] && [ ! -x /lib/systemd/systemd-resolved ] && [ ! -x "$RESOLVED_DIR/lib/systemd/systemd-resolved" ]; then
  echo "unpacking systemd-resolved into $RESOLVED_DIR"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq systemd-resolved 2>/dev/null || { $SUDO apt-get update -qq && apt-get download -qq systemd-resolved; })
  $SUDO mkdir -p "$RESOLVED_DIR"
  $SUDO dpkg-deb -x "$tmp"/systemd-resolved_*.deb "$RESOLVED_DIR"
  rm -rf "$tmp"
fi

if [ -z "$BENCH" ] && ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
