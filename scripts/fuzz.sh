#!/usr/bin/env bash
# The fuzz targets of fuzz/ (cargo fuzz, libFuzzer), one after another.
#
#   scripts/fuzz.sh run [SECONDS]   each target for SECONDS (default 120)
#   scripts/fuzz.sh smoke           each target for 10 s (part of make test)
#
# cargo-fuzz is installed once into OUTBOX_CACHE (default ~/.cache/outbox-stack).
# Targets are built without a sanitizer (the code under test is safe Rust: a
# finding is a panic), which needs no nightly toolchain beyond the flags
# RUSTC_BOOTSTRAP unlocks. A crash leaves its input in fuzz/artifacts/TARGET/
# and fails the run: turn it into a regression test, then fix it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTBOX_CACHE="${OUTBOX_CACHE:-$HOME/.cache/outbox-stack}"
FUZZ_ROOT="$OUTBOX_CACHE/cargo-fuzz"
export PATH="$FUZZ_ROOT/bin:$PATH"
export RUSTC_BOOTSTRAP=1

log() { printf '[fuzz] %s\n' "$*" >&2; }

install() {
  if command -v cargo-fuzz >/dev/null 2>&1; then return 0; fi
  log "installing cargo-fuzz into $FUZZ_ROOT (once; a few minutes)"
  cargo install cargo-fuzz --locked --root "$FUZZ_ROOT" >"$OUTBOX_CACHE/cargo-fuzz-install.log" 2>&1 ||
    { tail -n 20 "$OUTBOX_CACHE/cargo-fuzz-install.log" >&2; log "installing cargo-fuzz failed"; exit 1; }
}

run_all() {
  local seconds="$1" target
  cd "$ROOT/fuzz"
  log "building the targets"
  cargo fuzz build --sanitizer none --dev
  for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target" "artifacts/$target"
    # A copy of the committed seeds: what the fuzzer adds stays out of git.
    local work="$ROOT/fuzz/target-corpus/$target"
    mkdir -p "$work"
    cp -n "corpus/$target/"* "$work/" 2>/dev/null || true
    log "$target for ${seconds}s"
    local output="$ROOT/fuzz/artifacts/$target.log" status=0
    cargo fuzz run --sanitizer none --dev "$target" "$work" -- \
      -max_total_time="$seconds" -print_final_stats=1 -timeout=10 \
      -artifact_prefix="artifacts/$target/" >"$output" 2>&1 || status=$?
    grep -E '^(stat::number_of_executed_units|Done [0-9]+ runs)' "$output" | sed "s/^/[fuzz]   /" >&2 || true
    if [ "$status" -ne 0 ]; then
      tail -n 30 "$output" >&2
      log "$target found a crash (exit $status): its input is in fuzz/artifacts/$target/"
      exit 1
    fi
  done
}

install
case "${1:-}" in
  run) run_all "${2:-120}" ;;
  smoke) run_all 10 ;;
  *) echo "usage: $0 run [SECONDS] | smoke" >&2; exit 2 ;;
esac
