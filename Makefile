# kunpay: build, run, test, bench, lint.  `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
DEV_DIR ?= target/dev

.PHONY: help build run test test-deps test-deps-run bench lint fmt clean-dev aarch64 x86_64 rpm rpm-deps

help:
	@echo "make build      release build of kunpayd and kunpayctl (target/release/)"
	@echo "make run        development node: embedded PostgreSQL, demo keys, config in $(DEV_DIR)/"
	@echo "make test       every test (installs/starts what the tests need first: see test-deps)"
	@echo "make test-deps  check and provide the machine's test prerequisites, saying what it does"
	@echo "make bench      benchmarks; results written to BENCHMARKS.md"
	@echo "make lint       cargo fmt --check and clippy -D warnings"
	@echo "make aarch64    release build for Kunpeng (aarch64, glibc 2.28) in target/aarch64-unknown-linux-gnu/release/"
	@echo "make x86_64     release build for x86_64 servers (glibc 2.28) in target/x86_64-unknown-linux-gnu/release/"
	@echo "make rpm        both builds, then the RPMs (x86_64, aarch64) in target/rpm/, checked with rpmlint"

build:
	$(CARGO) build --release --locked --bins

# Builds, then runs a development node in the foreground; Ctrl-C stops it and its database.
run: test-deps-run
	$(CARGO) build --locked --bins
	./target/debug/kunpayd --dev $(DEV_DIR)

# Only what `make run` needs: PostgreSQL server binaries and the build libraries.
test-deps-run:
	@tests/deps.sh run

test-deps:
	@tests/deps.sh test

# The packaging tests (tests/packaging.rs) check the RPMs and the cross-built binaries, so the
# suite builds them first: about 7 minutes on a clean tree, seconds when nothing changed.
test: rpm test-deps
	$(CARGO) build --locked --all-targets
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --no-fail-fast; \
	else \
		echo "cargo-nextest not found: running the suite with cargo test"; \
		$(CARGO) test --locked --no-fail-fast; \
	fi

# The glibc 2.28 release binaries for the RPMs (cross/build.sh says how and why).
aarch64:
	@cross/build.sh aarch64

x86_64:
	@cross/build.sh x86_64

# Installs rpm, rpmlint and the cross toolchain when missing (packaging/deps.sh says what).
rpm-deps:
	@packaging/deps.sh

rpm: rpm-deps aarch64 x86_64
	@rm -f target/rpm/*.rpm
	@packaging/build-rpm.sh x86_64 aarch64
	rpmlint -c packaging/rpmlint.toml packaging/kunpay.spec target/rpm/*.rpm

bench: test-deps
	$(CARGO) bench --locked --bench crypto
	$(CARGO) bench --locked --bench risk
	$(CARGO) bench --locked --bench payments
	$(CARGO) bench --locked --bench audit
	$(CARGO) bench --locked --bench ha

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean-dev:
	@echo "removing the development node in $(DEV_DIR) (config, demo keys, embedded database)"
	rm -rf $(DEV_DIR)
