# Two commands on a fresh machine:
#   make demo   stack up, demo rows Postgres → Kafka → ClickHouse, rows shown
#   make test   stack up, fmt, clippy, every test; stack stopped at the end
#               (KEEP_STACK=1 leaves it running)
SHELL := /bin/bash
.DEFAULT_GOAL := help

# CI builds from a fresh clone: keep the cargo target dir outside it.
ifeq ($(CI),true)
export CARGO_TARGET_DIR ?= $(HOME)/.cache/outbox-stack/target
endif
export CARGO_TERM_COLOR ?= never

# Every optional feature is built and tested (one feature set: no crate is
# compiled twice).
# make demo SOURCE=wal streams the demo table from the write-ahead log.
SOURCE ?= flag-table
FEATURES := --features outbox-pg/sqlx,outbox-pg/wal,outbox-pg/otel

DURATION ?= 150s
SEED ?=
SIZE ?= full

FUZZ_SECONDS ?= 120

.PHONY: bench chaos fuzz help demo test stack-up stack-down stack-status stack-reset build fmt clippy unit

help:
	@echo "make demo        run the demo pipeline end to end and show the ClickHouse rows (SOURCE=wal: from the write-ahead log)"
	@echo "make test        stack up, cargo fmt --check, clippy, all tests (KEEP_STACK=1 keeps the stack)"
	@echo "make chaos       attack the pipeline (DURATION=150s, SEED=…) and verify it; see chaos/README.md"
	@echo "make bench       measure raw limits, the original design and ours (SIZE=small|full); see docs/performance.md"
	@echo "make fuzz        run every fuzz target for FUZZ_SECONDS (120) each; see fuzz/README.md"
	@echo "make stack-up    start PostgreSQL, Kafka (tansu) and ClickHouse (installs what is missing)"
	@echo "make stack-down  stop them; make stack-reset also deletes their data"

stack-up:
	@scripts/stack.sh up

stack-down:
	@scripts/cluster.sh down
	@scripts/stack.sh down

stack-status:
	@scripts/stack.sh status

stack-reset:
	@scripts/stack.sh reset

build:
	cargo build --workspace --bins

demo:
	@SOURCE=$(SOURCE) scripts/demo.sh

chaos:
	@scripts/stack.sh up
	cargo build -q -p examples -p chaos --bins
	cargo run -q -p chaos -- --duration $(DURATION) $(if $(SEED),--seed $(SEED),) $(ARGS)

fuzz:
	@scripts/fuzz.sh run $(FUZZ_SECONDS)

bench:
	@scripts/stack.sh up
	cargo build --release -q -p examples -p bench --bins
	cargo run --release -q -p bench -- --size $(SIZE) --out target/bench

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets $(FEATURES) -- -D warnings

test:
	@set -euo pipefail; \
	if [ "$${KEEP_STACK:-0}" != "1" ]; then trap 'scripts/cluster.sh down; scripts/stack.sh down' EXIT; fi; \
	scripts/stack.sh up; \
	scripts/cluster.sh up; \
	echo "== cargo fmt --check"; cargo fmt --all -- --check; \
	echo "== cargo clippy"; cargo clippy --workspace --all-targets $(FEATURES) -- -D warnings; \
	echo "== monitoring files (deploy/): promtool"; \
	promtool check config deploy/prometheus/prometheus.yml; \
	promtool test rules deploy/prometheus/rules.test.yml; \
	echo "== cargo package (each library crate could be published)"; \
	cargo package -q -p outbox-core -p outbox-pg -p outbox-kafka -p sink-clickhouse -p sink-file \
	  --allow-dirty --no-verify; \
	echo "== cargo test"; cargo test --workspace --all-targets $(FEATURES) --exclude examples --exclude chaos --exclude bench; \
	echo "== end-to-end tests (one at a time: they share one broker)"; \
	cargo test -p examples --all-targets $(FEATURES) -- --test-threads=1; \
	echo "== chaos: short attacked runs (fixed and random seed) and a broken relay the harness must catch"; \
	cargo build -p examples -p chaos --bins $(FEATURES); \
	cargo test -p chaos --all-targets $(FEATURES) -- --test-threads=1 --nocapture; \
	echo "== benchmark smoke run (checks it runs and reports; asserts no figure)"; \
	cargo build -p bench --bins $(FEATURES); \
	cargo test -p bench --all-targets $(FEATURES) -- --nocapture; \
	echo "== doc tests"; cargo test --workspace --doc $(FEATURES); \
	echo "== fuzz smoke (10 s per target)"; scripts/fuzz.sh smoke
