#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmarks need on a Debian machine:
# Debian packages (real servers and clients for the lab) and cargo-nextest.
# Package installs do not start their services (nginx, redis, dnsmasq): the lab runs
# its own instances inside network namespaces.
set -euo pipefail

PKGS=(iproute2 nginx redis-server redis-tools curl dnsutils iperf3 dnsmasq-base procps dnsperf)

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

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
