#!/usr/bin/env bash
# The sink on a current ClickHouse engine: chdb (ClickHouse in-process, from
# PyPI) runs what the Rust code wrote to a folder (DDL, lookups, RowBinary
# batches with the values they must decode to; see
# sink-clickhouse/tests/chdb.rs). The stack's server is 18.16; Docker users
# run 24 and later.
#
#   scripts/chdb.sh install      install chdb once into the cache
#   scripts/chdb.sh check DIR    install if needed, then check DIR/manifest.json
#
# Environment: OUTBOX_CACHE (default ~/.cache/outbox-stack), where the
# virtualenv (about 900 MB) is kept outside the checkout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTBOX_CACHE="${OUTBOX_CACHE:-$HOME/.cache/outbox-stack}"
VENV="$OUTBOX_CACHE/chdb-venv"
CHDB_SPEC='chdb>=4.4,<5'

log() { echo "[chdb] $*" >&2; }
die() { log "error: $*"; exit 1; }

install() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import chdb' 2>/dev/null; then
    return 0
  fi
  command -v python3 >/dev/null || die "python3 is missing: install it (Debian: apt-get install python3 python3-venv)"
  log "installing $CHDB_SPEC into $VENV (once; about 900 MB)"
  mkdir -p "$OUTBOX_CACHE"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$CHDB_SPEC" >"$OUTBOX_CACHE/chdb-install.log" 2>&1 ||
    { tail -n 20 "$OUTBOX_CACHE/chdb-install.log" >&2; die "pip could not install $CHDB_SPEC; check the package index"; }
}

case "${1:-}" in
  install) install ;;
  check)
    [ -n "${2:-}" ] || die "usage: $0 check DIR"
    install
    exec "$VENV/bin/python" "$here/chdb_check.py" "$2"
    ;;
  *) die "usage: $0 install | check DIR" ;;
esac
