#!/usr/bin/env bash
# Builds the kunpay RPMs from the glibc 2.28 release binaries (cross/build.sh) with
# packaging/kunpay.spec, into target/rpm/.
#   packaging/build-rpm.sh [ARCH...]      ARCH: x86_64, aarch64 (default: both)
# Environment (the packaging tests use these to build an upgrade):
#   KUNPAY_RPM_RELEASE   RPM release number (default 1)
#   KUNPAY_RPM_CONFIG    file packaged as /etc/kunpay/kunpay.toml (default packaging/kunpay.toml)
#   KUNPAY_RPM_OUT       output directory (default target/rpm)
#   KUNPAY_RPM_BINDIR    where the binaries are (default target/<triple>/release); the
#                        kunpay-coresim subpackage is built when kunpay-coresim is there too
# The binaries must exist (make aarch64 / make x86_64 build them); this script does not build
# them, so that it packages exactly what was built and tested.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "rpm: $*"; }

arches=("$@")
[ ${#arches[@]} -gt 0 ] || arches=(x86_64 aarch64)
release=${KUNPAY_RPM_RELEASE:-1}
config=${KUNPAY_RPM_CONFIG:-packaging/kunpay.toml}
out=${KUNPAY_RPM_OUT:-target/rpm}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || { say "cannot read the version from Cargo.toml"; exit 1; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$out/build
# Reproducible tarballs and package timestamps: the time of the last commit.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

for arch in "${arches[@]}"; do
  case "$arch" in
    # objcopy of binutils for the architecture (binutils-aarch64-linux-gnu; zig's objcopy
    # cannot split debug information yet).
    aarch64) triple=aarch64-unknown-linux-gnu; run=(qemu-aarch64 -L /); objcopy=aarch64-linux-gnu-objcopy ;;
    x86_64) triple=x86_64-unknown-linux-gnu; run=(); objcopy=objcopy ;;
    *) say "unknown architecture $arch"; exit 2 ;;
  esac
  bindir=${KUNPAY_RPM_BINDIR:-target/$triple/release}
  for bin in kunpayd kunpayctl kunpay-audit; do
    [ -x "$bindir/$bin" ] || { say "$bindir/$bin missing: run make $arch first"; exit 1; }
  done
  # Never package a binary whose version differs from the package's.
  got=$("${run[@]}" "$bindir/kunpayd" --version)
  [ "$got" = "kunpayd $version" ] || { say "$bindir/kunpayd --version says '$got', expected 'kunpayd $version'"; exit 1; }

  stage=$work/stage-$arch/kunpay-$version
  rm -rf "$work/stage-$arch"
  mkdir -p "$stage/bin" "$stage/packaging" "$stage/docs" "$work/SOURCES" "$out/debug"
  bins=(kunpayd kunpayctl kunpay-audit)
  coresim=()
  if [ -x "$bindir/kunpay-coresim" ]; then bins+=(kunpay-coresim); coresim=(--with coresim); fi
  for bin in "${bins[@]}"; do
    # Debug information goes to target/rpm/debug/ (kept with the build for crash analysis);
    # the packaged binary keeps its symbol table so backtraces name functions.
    debug=$out/debug/$bin-$version-$release.$arch.debug
    "$objcopy" --only-keep-debug "$bindir/$bin" "$debug"
    "$objcopy" --strip-debug --add-gnu-debuglink="$debug" "$bindir/$bin" "$stage/bin/$bin"
    chmod 0755 "$stage/bin/$bin"
  done
  cp -r systemd "$stage/"
  cp "$config" "$stage/packaging/kunpay.toml"
  cp packaging/coresim.toml "$stage/packaging/coresim.toml"
  cp -r packaging/risk "$stage/packaging/risk"
  cp README.md "$stage/"
  mkdir -p "$stage/coresim"
  cp packaging/coresim-README.md "$stage/coresim/README.md"
  cp docs/*.md "$stage/docs/"
  tarball=$work/SOURCES/kunpay-$version-$arch.tar.gz
  tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    -C "$work/stage-$arch" -czf "$tarball" "kunpay-$version"

  say "rpmbuild --target $arch (kunpay $version-$release${coresim:+, with coresim})"
  rpmbuild -bb --quiet --target "$arch" \
    --define "_topdir $work" \
    --define "kunpay_version $version" \
    --define "kunpay_release $release" \
    --define "packager kunpay packaging <packaging@kunpay.invalid>" \
    --define "use_source_date_epoch_as_buildtime 1" \
    --define "clamp_mtime_to_source_date_epoch 1" \
    "${coresim[@]}" packaging/kunpay.spec
  mv "$work/RPMS/$arch/"*.rpm "$out/"
done
ls -l "$out"/*.rpm | sed 's/^/rpm: /'
