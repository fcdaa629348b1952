#!/usr/bin/env bash
# Provides what kunpay's build, `make run` and tests need on a Debian 12 machine like the ones we
# build on, and says what it does. Idempotent: on a prepared machine it only checks.
#   tests/deps.sh run    PostgreSQL server binaries and build libraries (for `make run`)
#   tests/deps.sh test   also: the shared PostgreSQL server running, openssl with SM2, cargo-nextest
set -euo pipefail
what=${1:-test}
say() { echo "deps: $*"; }

apt_updated=
apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    say "missing Debian packages: $*; install them as root: apt-get install -y $*"; exit 1
  fi
  if [ -z "$apt_updated" ]; then say "apt-get update"; apt-get update -qq; apt_updated=1; fi
  say "installing Debian packages: $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need=()
command -v pg_config >/dev/null || need+=(libpq-dev)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v openssl >/dev/null || need+=(openssl)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

# PostgreSQL refuses to run as root; private clusters run as this account when we are root.
if [ "$(id -u)" -eq 0 ] && ! id "${KUNPAY_PG_USER:-postgres}" >/dev/null 2>&1; then
  say "creating system account ${KUNPAY_PG_USER:-postgres} for private PostgreSQL clusters"
  useradd -r -s /usr/sbin/nologin "${KUNPAY_PG_USER:-postgres}"
fi

[ "$what" = run ] && exit 0

if ! openssl list -signature-algorithms 2>/dev/null | grep -q SM2; then
  say "the openssl command line lacks SM2; the interop tests need OpenSSL 3 with SM2"; exit 1
fi

# The shared server for per-test databases (CI machines run PostgreSQL 15 on 127.0.0.1:5432).
url=${KUNPAY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
if ! psql "$url" -qAtc 'SELECT 1' >/dev/null 2>&1; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    for version in $(ls /etc/postgresql); do
      say "starting PostgreSQL cluster $version/main (pg_ctlcluster)"
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 30); do psql "$url" -qAtc 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
  fi
  if ! psql "$url" -qAtc 'SELECT 1' >/dev/null 2>&1; then
    say "no PostgreSQL answers at $url; start one with trust authentication for local connections, or set KUNPAY_TEST_DATABASE_URL"
    exit 1
  fi
fi

# RabbitMQ for the core-link tests (tests/core_link.rs); another broker: KUNPAY_TEST_AMQP_URL.
if [ -z "${KUNPAY_TEST_AMQP_URL:-}" ] && ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  say "starting RabbitMQ"
  service rabbitmq-server start >/dev/null 2>&1 || rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
  if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    say "no RabbitMQ answers on 127.0.0.1:5672; start one (guest/guest) or set KUNPAY_TEST_AMQP_URL"; exit 1
  fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  say "cargo-nextest not installed; installing it from crates.io (cargo install --locked cargo-nextest)"
  cargo install --locked cargo-nextest >/dev/null 2>&1 || say "could not install cargo-nextest; make test falls back to cargo test"
fi
say "ok"
