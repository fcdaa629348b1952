#!/usr/bin/env bash
# Release builds of kunpayd and kunpayctl that run on glibc 2.28 (Kylin V10, openEuler 20.03),
# for the RPMs.
#   cross/build.sh aarch64   -> target/aarch64-unknown-linux-gnu/release/  (Kunpeng)
#   cross/build.sh x86_64    -> target/x86_64-unknown-linux-gnu/release/
#
# How (see ../shared/notes/cross-aarch64.md for the measurements behind each choice):
# - cargo-zigbuild links with zig against glibc 2.28 symbol stubs (target suffix ".2.28"), so
#   the binary needs nothing newer than GLIBC_2.28 whatever glibc this machine has (2.36).
# - OpenSSL is compiled in (feature vendored-openssl): the targets ship OpenSSL 1.1.1, and the
#   system libssl3 here would add an OPENSSL_3.0.0 requirement.
# - libpq stays dynamic: openGauss's SHA256/SM3 password methods work only with openGauss's own
#   libpq.so.5, which the bank installs and the binary must load in place of PostgreSQL's.
# - aarch64 needs an aarch64 Rust std, which rustup cannot download here: Debian's rustc-web
#   (/usr/bin/rustc, 1.96) with libstd-rust-web-dev:arm64 provides one. x86_64 uses the rustup
#   toolchain, which has the x86_64 std.
# cross/deps.sh installs whatever is missing first and says what.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:?usage: cross/build.sh aarch64|x86_64}
say() { echo "cross: $*"; }

case "$arch" in
  aarch64) triple=aarch64-unknown-linux-gnu; multiarch=aarch64-linux-gnu ;;
  x86_64) triple=x86_64-unknown-linux-gnu; multiarch=x86_64-linux-gnu ;;
  *) echo "cross/build.sh: unknown architecture $arch (aarch64 or x86_64)" >&2; exit 2 ;;
esac
glibc=2.28

cross/deps.sh "$arch"
venv=${KUNPAY_CROSS_VENV:-target/cross/venv}
export PATH="$PWD/$venv/bin:$PATH"

# libpq: link against the distribution's libpq.so.5 through a directory holding only a
# libpq.so symlink. Pointing the linker at /usr/lib/$multiarch itself would let it pick up that
# directory's other libraries (built for glibc 2.36); libpq-dev:arm64 cannot be installed
# beside libpq-dev:amd64 (not Multi-Arch: same).
pqdir=$PWD/target/cross/libpq-$arch
mkdir -p "$pqdir"
ln -sfn "/usr/lib/$multiarch/libpq.so.5" "$pqdir/libpq.so"
triple_env=$(echo "$triple" | tr 'a-z-' 'A-Z_')
export "PQ_LIB_DIR_${triple_env}=$pqdir"

cargo=(cargo)
if [ "$arch" = aarch64 ]; then
  # rustup's shims come first on PATH and their compilers have no aarch64 std (E0514).
  export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
  export CARGO=/usr/bin/cargo
  cargo=(/usr/bin/cargo)
fi

say "building kunpayd and kunpayctl for $triple (glibc $glibc, vendored OpenSSL, dynamic libpq) with $("${RUSTC:-rustc}" --version)"
start=$(date +%s)
"${cargo[@]}" zigbuild --release --locked --bins --features vendored-openssl --target "$triple.$glibc"
say "built in $(( $(date +%s) - start ))s: target/$triple/release/{kunpayd,kunpayctl}"
