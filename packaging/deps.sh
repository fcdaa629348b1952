#!/usr/bin/env bash
# Provides what `make rpm` and the packaging tests need on a Debian 12 machine, saying what it
# installs: rpm (rpmbuild), rpmlint, and the cross toolchain (cross/deps.sh) for both
# architectures. Idempotent: on a prepared machine it only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "packaging-deps: $*"; }

need=()
command -v rpmbuild >/dev/null || need+=(rpm)
command -v rpmlint >/dev/null || need+=(rpmlint)
# The install test runs the packages' scriptlets in a scratch root with these tools.
command -v useradd >/dev/null || need+=(passwd)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || { say "missing Debian packages: ${need[*]}; install them as root"; exit 1; }
  say "apt-get update"
  apt-get update -qq
  say "installing Debian packages: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cross/deps.sh x86_64 >/dev/null
cross/deps.sh aarch64
say "ok"
