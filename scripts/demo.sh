#!/usr/bin/env bash
# The demo, end to end: stack up, schema and demo rows in PostgreSQL, the
# consumer and the producer running until every row is in ClickHouse, the
# rows shown, the binaries stopped. Running it again doubles nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
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

step "[4/5] running consumer_to_clickhouse and producer_pg_to_kafka"
LOGS="$ROOT/.stack/demo"
mkdir -p "$LOGS"
"$BIN/consumer_to_clickhouse" >"$LOGS/consumer.log" 2>&1 &
CONSUMER=$!
trap 'kill -TERM $CONSUMER 2>/dev/null || true' EXIT
"$BIN/producer_pg_to_kafka" --drain 2>"$LOGS/producer.log"
expected="$(pg_count 'SELECT count(*) FROM user_logins WHERE sent_to_kafka')"
deadline=$((SECONDS + 60))
while :; do
  have="$(ch 'SELECT count() FROM user_logins' 2>/dev/null || echo 0)"
  printf '\r    ClickHouse user_logins: %s / %s rows' "$have" "$expected"
  [ "$have" -ge "$expected" ] && break
  if ((SECONDS > deadline)); then
    echo; echo "timed out; consumer log:"; tail -n 20 "$LOGS/consumer.log"; exit 1
  fi
  sleep 0.5
done
echo
kill -TERM "$CONSUMER"
wait "$CONSUMER" || true
trap - EXIT

step "[5/5] ClickHouse user_logins"
ch 'SELECT id, username, event_type, event_time, kafka_partition, kafka_offset FROM user_logins ORDER BY id FORMAT PrettyCompactMonoBlock'
ch "SELECT count() AS rows, uniqExact(event_id) AS distinct_events FROM user_logins FORMAT PrettyCompactMonoBlock"
echo "Logs: $LOGS. Stop the stack with: make stack-down"
