#!/usr/bin/env bash
# Provides the cross toolchain cross/build.sh needs on a Debian 12 x86_64 machine, saying what it
# installs. Idempotent: on a prepared machine it only checks (about a second).
#   cross/deps.sh aarch64   Debian: rustc-web, cargo-web, libstd-rust-web-dev:arm64 (Rust 1.96
#                           with an aarch64 std), libpq5:arm64 (linked against, and loaded under
#                           qemu), qemu-user (runs the aarch64 tests), binutils-aarch64-linux-gnu
#                           (objcopy, to split debug information for the RPM); adds dpkg
#                           architecture arm64.
#   cross/deps.sh x86_64    nothing from Debian beyond libpq5 (tests/deps.sh installs libpq-dev).
#   both:                   a Python venv in target/cross/venv with ziglang and cargo-zigbuild
#                           from PyPI (zig is the linker that targets glibc 2.28).
# Caution (../shared/notes/cross-aarch64.md): installing the :arm64 libraries upgrades their
# amd64 twins to the same version, possibly the postgresql-15 server, which can stop the local
# PostgreSQL the tests use. When it was answering before and is not afterwards, it is restarted.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:?usage: cross/deps.sh aarch64|x86_64}
say() { echo "cross-deps: $*"; }

# Versions tested together; cargo-zigbuild's ".2.28" glibc suffix and zig's glibc stubs both matter.
ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.0

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

pg_url=${KUNPAY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pg_up() { command -v psql >/dev/null && psql "$pg_url" -qAtc 'SELECT 1' >/dev/null 2>&1; }

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    say "missing Debian packages: $*; install them as root (apt-get install --no-install-recommends $*)"; exit 1
  fi
  local was_up=
  pg_up && was_up=1
  say "apt-get update"
  apt-get update -qq
  say "installing Debian packages: $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  if [ -n "$was_up" ] && ! pg_up; then
    say "PostgreSQL stopped during the install (its package was upgraded); starting it again"
    for version in $(ls /etc/postgresql 2>/dev/null); do
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
    pg_up || { say "PostgreSQL at $pg_url does not answer after the install; start it by hand"; exit 1; }
  fi
}

need=()
case "$arch" in
  aarch64)
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
      say "adding dpkg architecture arm64 (for libstd-rust-web-dev:arm64 and libpq5:arm64)"
      [ "$(id -u)" -eq 0 ] || { say "run as root: dpkg --add-architecture arm64"; exit 1; }
      dpkg --add-architecture arm64
    fi
    for p in rustc-web cargo-web libstd-rust-web-dev:arm64 libpq5:arm64 qemu-user binutils-aarch64-linux-gnu; do
      installed "$p" || need+=("$p")
    done
    ;;
  x86_64)
    installed libpq5:amd64 || need+=(libpq5)
    ;;
  *) echo "cross/deps.sh: unknown architecture $arch" >&2; exit 2 ;;
esac
command -v python3 >/dev/null || need+=(python3 python3-venv)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

venv=${KUNPAY_CROSS_VENV:-target/cross/venv}
if ! "$venv/bin/cargo-zigbuild" --version 2>/dev/null | grep -q " $CARGO_ZIGBUILD_VERSION\$" \
   || ! "$venv/bin/python3" -c "import ziglang, importlib.metadata as m; assert m.version('ziglang') == '$ZIGLANG_VERSION'" 2>/dev/null; then
  say "creating $venv with ziglang==$ZIGLANG_VERSION and cargo-zigbuild==$CARGO_ZIGBUILD_VERSION from PyPI"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
fi
say "ok ($arch)"
