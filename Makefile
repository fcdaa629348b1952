# kunpay: build, run, test, bench, lint.  `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
DEV_DIR ?= target/dev

.PHONY: help build run test test-deps test-deps-run bench lint fmt clean-dev

help:
	@echo "make build      release build of kunpayd and kunpayctl (target/release/)"
	@echo "make run        development node: embedded PostgreSQL, demo keys, config in $(DEV_DIR)/"
	@echo "make test       every test (installs/starts what the tests need first: see test-deps)"
	@echo "make test-deps  check and provide the machine's test prerequisites, saying what it does"
	@echo "make bench      benchmarks; results written to BENCHMARKS.md"
	@echo "make lint       cargo fmt --check and clippy -D warnings"

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

test: test-deps
	$(CARGO) build --locked --all-targets
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --no-fail-fast; \
	else \
		echo "cargo-nextest not found: running the suite with cargo test"; \
		$(CARGO) test --locked --no-fail-fast; \
	fi

bench: test-deps
	$(CARGO) bench --locked --bench crypto
	$(CARGO) bench --locked --bench payments

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean-dev:
	@echo "removing the development node in $(DEV_DIR) (config, demo keys, embedded database)"
	rm -rf $(DEV_DIR)
