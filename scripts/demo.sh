#!/usr/bin/env bash
# The demo, end to end: stack up, schema and demo rows in PostgreSQL, the
# consumer and the producer running until every row is in ClickHouse, the
# rows shown, the binaries stopped. Running it again doubles nothing.
#
# SOURCE=wal (make demo SOURCE=wal): the producer streams user_logins from
# the write-ahead log instead of polling its sent_to_kafka flag, and captures
# the three rows inserted while it runs, into ClickHouse user_logins_wal (the
# flag demo's ids differ, so the two demos keep tables of their own). The
# slot is dropped at the end, so it keeps no WAL between runs; each run
# captures its own rows, without an initial load (a load would publish the
# rows an earlier run captured as changes again, under other ids).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SOURCE="${SOURCE:-flag-table}"
case "$SOURCE" in
  flag-table) CH_TABLE=user_logins ;;
  wal) CH_TABLE=user_logins_wal ;;
  *) echo "SOURCE must be flag-table or wal, not $SOURCE" >&2; exit 2 ;;
esac
step() { printf '\n==> %s\n' "$*"; }

step "[1/5] starting the stack (PostgreSQL :5432, Kafka :9092, ClickHouse :8123)"
scripts/stack.sh up

step "[2/5] building the binaries"
cargo build -q -p examples --bins
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"

step "[3/5] creating the schema and demo rows (init.sql)"
PGPASSWORD=admin psql -q -h 127.0.0.1 -p 5432 -U admin -d test_db -v ON_ERROR_STOP=1 \
  -c "SET client_min_messages = warning" -f init.sql >/dev/null
pg_count() { PGPASSWORD=admin psql -tAq -h 127.0.0.1 -U admin -d test_db -c "$1"; }
ch() { curl -fsS -u user:strongpassword http://127.0.0.1:8123/ --data-binary "$1"; }
echo "user_logins rows in PostgreSQL: $(pg_count 'SELECT count(*) FROM user_logins')" \
  "(not yet sent: $(pg_count 'SELECT count(*) FROM user_logins WHERE NOT sent_to_kafka'))"

step "[4/5] running consumer_to_clickhouse and producer_pg_to_kafka (source: $SOURCE)"
LOGS="$ROOT/.stack/demo"
mkdir -p "$LOGS"
"$BIN/consumer_to_clickhouse" --clickhouse-table "$CH_TABLE" >"$LOGS/consumer.log" 2>&1 &
CONSUMER=$!
trap 'kill -TERM $CONSUMER 2>/dev/null || true' EXIT
if [ "$SOURCE" = wal ]; then
  "$BIN/producer_pg_to_kafka" --source wal --wal-no-initial-load --metrics-addr 127.0.0.1:0 2>"$LOGS/producer.log" &
  PRODUCER=$!
  trap 'kill -TERM $CONSUMER $PRODUCER 2>/dev/null || true' EXIT
  # The slot exists once the relay streams.
  deadline=$((SECONDS + 60))
  until [ "$(pg_count "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_wal' AND active")" = 1 ]; do
    if ((SECONDS > deadline)); then echo "the relay never streamed; log:"; tail -n 20 "$LOGS/producer.log"; exit 1; fi
    sleep 0.5
  done
  before="$(ch "SELECT count() FROM $CH_TABLE" 2>/dev/null || echo 0)"
  pg_count "INSERT INTO user_logins (username, event_type) VALUES ('dave', 'login'), ('erin', 'login'), ('dave', 'logout')" >/dev/null
  echo "inserted 3 rows while the relay streams the WAL"
  expected=$((before + 3))
else
  "$BIN/producer_pg_to_kafka" --drain 2>"$LOGS/producer.log"
  expected="$(pg_count 'SELECT count(*) FROM user_logins WHERE sent_to_kafka')"
fi
deadline=$((SECONDS + 60))
while :; do
  have="$(ch "SELECT count() FROM $CH_TABLE" 2>/dev/null || echo 0)"
  printf '\r    ClickHouse %s: %s / %s rows' "$CH_TABLE" "$have" "$expected"
  [ "$have" -ge "$expected" ] && break
  if ((SECONDS > deadline)); then
    echo; echo "timed out; consumer log:"; tail -n 20 "$LOGS/consumer.log"; exit 1
  fi
  sleep 0.5
done
echo
if [ "$SOURCE" = wal ]; then
  kill -TERM "$PRODUCER"
  wait "$PRODUCER" || true
  # A slot left behind would keep every WAL segment the server writes from
  # now on.
  pg_count "SELECT pg_drop_replication_slot('outbox_wal')" >/dev/null
  pg_count "DELETE FROM outbox_wal_progress WHERE slot = 'outbox_wal'" >/dev/null
fi
kill -TERM "$CONSUMER"
wait "$CONSUMER" || true
trap - EXIT

step "[5/5] ClickHouse $CH_TABLE"
ch "SELECT id, username, event_type, event_time, kafka_partition, kafka_offset FROM $CH_TABLE ORDER BY id FORMAT PrettyCompactMonoBlock"
ch "SELECT count() AS rows, uniqExact(event_id) AS distinct_events FROM $CH_TABLE FORMAT PrettyCompactMonoBlock"
echo "Logs: $LOGS. Stop the stack with: make stack-down"
