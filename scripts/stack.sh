#!/usr/bin/env bash
# Local stack without Docker: PostgreSQL, the tansu Kafka-protocol broker and
# ClickHouse, on the demo's ports, with their data under .stack/ in the checkout.
#
#   scripts/stack.sh up       install what is missing, start what is down, wait until each answers
#   scripts/stack.sh down     stop the servers this checkout started
#   scripts/stack.sh status   say what runs
#   scripts/stack.sh reset    down, then delete .stack/ (all data)
#   scripts/stack.sh restart SERVICE   restart postgres|kafka|clickhouse (data kept)
#   scripts/stack.sh crash SERVICE     SIGKILL it, then start it again (data kept)
#
# Idempotent: rerunning `up` starts only what is down. A server left on one of
# our ports by an earlier checkout (postgres, tansu or clickhouse) is stopped;
# any other program holding a port is reported, not touched.
#
# Environment: STACK_DIR (default <checkout>/.stack), OUTBOX_CACHE (default
# ~/.cache/outbox-stack: where the tansu binary is built once), and the ports
# PG_PORT (5432), KAFKA_PORT (9092), CH_HTTP_PORT (8123), CH_TCP_PORT (9000),
# CH_HTTPS_PORT (8443).
#
# TLS: a CA of its own (.stack/tls/ca.crt) signs a certificate for
# `localhost`; PostgreSQL offers TLS with it and ClickHouse serves HTTPS on
# CH_HTTPS_PORT, so the clients' verify modes are tested against real
# servers. .stack/tls/other-ca.crt is a CA that signed nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="${STACK_DIR:-$ROOT/.stack}"
OUTBOX_CACHE="${OUTBOX_CACHE:-$HOME/.cache/outbox-stack}"
PG_PORT="${PG_PORT:-5432}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
CH_HTTP_PORT="${CH_HTTP_PORT:-8123}"
CH_TCP_PORT="${CH_TCP_PORT:-9000}"
CH_INTERSERVER_PORT="${CH_INTERSERVER_PORT:-9009}"
CH_HTTPS_PORT="${CH_HTTPS_PORT:-8443}"
TLS_DIR="$STACK_DIR/tls"
TANSU_VERSION="0.6.0"
TANSU_BIN="$OUTBOX_CACHE/tansu-$TANSU_VERSION/bin/tansu"

# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

apt_install() {
  log "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 || {
    as_root apt-get update -q >/dev/null 2>&1 || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null ||
      die "could not install $* with apt-get; install them by hand and rerun"
  }
}

wait_for() {
  local what="$1" timeout_s="$2" logfile="$3"
  shift 3
  local deadline=$((SECONDS + timeout_s))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "$what did not answer within ${timeout_s}s; last lines of $logfile:"
      tail -n 20 "$logfile" >&2 2>/dev/null || true
      die "$what did not come up"
    fi
    sleep 0.25
  done
}

# ClickHouse loads every part of every table before it answers: seconds on a
# fresh stack, minutes after long runs left tens of thousands of parts. So it
# is waited for as long as its process lives (up to CH_START_TIMEOUT, 900 s),
# and a process that exits fails at once.
ch_wait() {
  local pid="$1" logfile="$2"
  local timeout_s="${CH_START_TIMEOUT:-900}"
  local deadline=$((SECONDS + timeout_s)) next_note=$((SECONDS + 30))
  until ch_ready >/dev/null 2>&1; do
    if ! pid_alive "$pid"; then
      log "clickhouse exited before answering; last lines of $logfile and of $CH_LOG:"
      tail -n 20 "$logfile" >&2 2>/dev/null || true
      tail -n 20 "$CH_LOG" >&2 2>/dev/null || true
      die "clickhouse on 127.0.0.1:$CH_HTTP_PORT did not come up"
    fi
    if ((SECONDS >= deadline)); then
      log "clickhouse did not answer within ${timeout_s}s; last lines of $CH_LOG:"
      tail -n 20 "$CH_LOG" >&2 2>/dev/null || true
      die "clickhouse on 127.0.0.1:$CH_HTTP_PORT did not come up (raise CH_START_TIMEOUT, or drop tables left by old runs)"
    fi
    if ((SECONDS >= next_note)); then
      log "clickhouse still loading its tables ($(du -sh "$CH_DIR/data" 2>/dev/null | cut -f1) of data)..."
      next_note=$((SECONDS + 30))
    fi
    sleep 0.25
  done
}

# ---------------------------------------------------------------- PostgreSQL

pg_bin() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
  if [ -z "$dir" ] || [ ! -x "$dir/initdb" ]; then
    apt_install postgresql
    dir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
  fi
  echo "$dir"
}

# Resolved through the link that a checkout under a private folder uses
# (see pg_up): the server must be given paths it can reach.
pg_paths() {
  local home="$STACK_DIR/postgres"
  [ -L "$home" ] && home="$(readlink -f "$home")"
  PG_DATA="$home/data"
  PG_RUN="$home/run"
  PG_LOG="$home/postgres.log"
}
pg_paths

pg_pid() { head -1 "$PG_DATA/postmaster.pid" 2>/dev/null || true; }

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -d postgres; }

# Runs a command as the postgres OS user (the server refuses to run as root).
as_pg() {
  # From /, which it can always enter (the checkout may be private).
  if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# The demo's role and database (idempotent: also run on a server already up,
# so a stack from an older checkout gets what this one needs).
pg_provision() {
  local bin
  bin="$(pg_bin)"
  as_pg "$bin/psql" -h "$PG_RUN" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q >/dev/null <<'EOF'
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'admin') THEN
    CREATE ROLE admin LOGIN PASSWORD 'admin';
  END IF;
END $$;
-- Like the Docker image's user, admin may create the narrower roles of
-- docs/security.md (and the tests that prove those grants do).
ALTER ROLE admin CREATEROLE;
-- Autovacuum looks at each database every 10 s instead of every minute, so
-- the retention test sees the outbox's own settings at work (docs/performance.md).
ALTER SYSTEM SET autovacuum_naptime = '10s';
-- The WAL source (outbox-pg's `wal` module) reads logical replication:
-- wal_level takes effect at the next start (pg_up restarts once for it).
-- A stalled reader's slot is taken over after wal_sender_timeout, so it is
-- short here; see docs/wal.md.
ALTER SYSTEM SET wal_level = 'logical';
ALTER SYSTEM SET max_replication_slots = 32;
ALTER SYSTEM SET max_wal_senders = 32;
ALTER SYSTEM SET wal_sender_timeout = '10s';
ALTER ROLE admin REPLICATION;
SELECT pg_reload_conf();
SELECT 'CREATE DATABASE test_db OWNER admin'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'test_db') \gexec
EOF
}

pg_up() {
  local bin
  bin="$(pg_bin)"
  tls_up
  if pid_alive "$(pg_pid)" && pg_ready; then
    pg_paths
    if [ "$(as_pg "$bin/psql" -h "$PG_RUN" -p "$PG_PORT" -U postgres -d postgres -tAc 'SHOW ssl' 2>/dev/null)" = "on" ]; then
      log "postgres already running (pid $(pg_pid), port $PG_PORT)"
      pg_provision
      pg_logical
      return 0
    fi
    log "postgres runs without TLS (started by an older stack script): restarting it"
    pg_down
  fi
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    # The server runs as postgres and must be able to reach its folder.
    chmod o+x "$STACK_DIR" "$ROOT" 2>/dev/null || true
    if [ ! -e "$STACK_DIR/postgres" ] && ! runuser -u postgres -- test -x "$STACK_DIR"; then
      # A checkout under a private folder (e.g. /root): keep the data in a
      # folder of this checkout's own under /var/tmp, linked from .stack/.
      local elsewhere
      elsewhere="/var/tmp/outbox-stack-$(printf '%s' "$ROOT" | sha1sum | cut -c1-12)/postgres"
      log "postgres cannot reach $STACK_DIR; its data goes to $elsewhere (linked from .stack/postgres)"
      mkdir -p "$elsewhere"
      chmod 755 "$(dirname "$elsewhere")"
      ln -sfn "$elsewhere" "$STACK_DIR/postgres"
    fi
    mkdir -p "$STACK_DIR/postgres/"
    chown postgres "$STACK_DIR/postgres/"
  else
    mkdir -p "$STACK_DIR/postgres"
  fi
  pg_paths
  if [ ! -s "$PG_DATA/PG_VERSION" ]; then
    log "initialising postgres in $PG_DATA"
    as_pg "$bin/initdb" -D "$PG_DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      --encoding=UTF8 --locale=C.UTF-8 >"$STACK_DIR/postgres/initdb.log" 2>&1 ||
      { tail -n 5 "$STACK_DIR/postgres/initdb.log" >&2; die "initdb failed; see $STACK_DIR/postgres/initdb.log"; }
    cat >>"$PG_DATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_RUN'
max_connections = 200
EOF
  fi
  as_pg mkdir -p "$PG_RUN"
  rm -f "$PG_DATA/postmaster.pid.stale"
  if [ -f "$PG_DATA/postmaster.pid" ] && ! pid_alive "$(pg_pid)"; then
    log "removing stale postgres pid file"
    rm -f "$PG_DATA/postmaster.pid"
  fi
  free_port "$PG_PORT" postgres
  # The server wants its key private to itself: a copy it owns.
  local home="$STACK_DIR/postgres"
  cp "$TLS_DIR/server.crt" "$home/server.crt"
  cp "$TLS_DIR/server.key" "$home/server.key"
  chmod 600 "$home/server.key"
  [ "$(id -u)" -eq 0 ] && chown postgres "$home/server.crt" "$home/server.key"
  log "starting postgres on 127.0.0.1:$PG_PORT (TLS offered)"
  as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 \
    -o "-c ssl=on -c ssl_cert_file=$(readlink -f "$home")/server.crt -c ssl_key_file=$(readlink -f "$home")/server.key" \
    start >/dev/null ||
    { tail -n 20 "$PG_LOG" >&2 || true; die "postgres did not start"; }
  wait_for "postgres on 127.0.0.1:$PG_PORT" 60 "$PG_LOG" pg_ready
  pg_provision
  pg_logical
  log "postgres ready (db test_db, user admin)"
}

# wal_level is read at start only: a server provisioned before the WAL source
# existed is restarted once, with its data.
pg_logical() {
  local bin level
  bin="$(pg_bin)"
  level="$(as_pg "$bin/psql" -h "$PG_RUN" -p "$PG_PORT" -U postgres -d postgres -tAc 'SHOW wal_level')"
  [ "$level" = "logical" ] && return 0
  log "postgres runs with wal_level=$level: restarting it for logical replication"
  as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 restart >/dev/null ||
    { tail -n 20 "$PG_LOG" >&2 || true; die "postgres did not restart"; }
  wait_for "postgres on 127.0.0.1:$PG_PORT" 60 "$PG_LOG" pg_ready
}

pg_down() {
  local pid
  pid="$(pg_pid)"
  if pid_alive "$pid"; then
    log "stopping postgres (pid $pid)"
    as_pg "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1 || stop_pid "$pid" 10
  fi
}

# ------------------------------------------------------------ build needs

# The workspace links the system's OpenSSL (TLS to every service): its
# headers and pkg-config must be there before cargo builds.
build_deps() {
  if ! { command -v pkg-config >/dev/null && pkg-config --exists openssl; }; then
    apt_install libssl-dev pkg-config
  fi
}

# The chaos harness cuts a client's path to Kafka in the kernel's packet
# filter (a proxy cannot sit on it: clients reconnect to the broker's
# advertised address).
test_tools() {
  command -v iptables >/dev/null || apt_install iptables
  # The monitoring files are checked by promtool and a Prometheus server
  # the tests start themselves (on free ports; the package's own service is
  # not used). Without recommends: no node exporter comes along.
  { command -v promtool >/dev/null && command -v prometheus >/dev/null; } ||
    apt_install --no-install-recommends prometheus
}

# ---------------------------------------------------------------------- TLS

tls_up() {
  [ -s "$TLS_DIR/server.crt" ] && [ -s "$TLS_DIR/other-ca.crt" ] && return 0
  command -v openssl >/dev/null || apt_install openssl
  log "creating a test CA and a certificate for localhost in $TLS_DIR"
  mkdir -p "$TLS_DIR"
  (
    cd "$TLS_DIR"
    ca() { # name, subject
      openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "$2" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$1.key" -out "$1.crt"
    }
    ca ca "/CN=outbox stack test CA"
    ca other-ca "/CN=outbox stack unrelated CA"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
    printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.crt
    rm -f server.csr server.ext ca.srl
    chmod 600 ./*.key
  ) >"$STACK_DIR/tls.log" 2>&1 || { tail -n 5 "$STACK_DIR/tls.log" >&2; die "could not create the TLS certificates"; }
}

# -------------------------------------------------------------------- tansu

tansu_install() {
  [ -x "$TANSU_BIN" ] && return 0
  command -v cargo >/dev/null || die "cargo is needed to build the tansu broker"
  log "building tansu $TANSU_VERSION into $OUTBOX_CACHE (once; about 11 minutes on 2 cores)"
  mkdir -p "$OUTBOX_CACHE"
  CARGO_TARGET_DIR="$OUTBOX_CACHE/tansu-build" cargo install tansu --version "$TANSU_VERSION" \
    --locked --features libsql --root "$OUTBOX_CACHE/tansu-$TANSU_VERSION" \
    >"$OUTBOX_CACHE/tansu-install.log" 2>&1 ||
    { tail -n 30 "$OUTBOX_CACHE/tansu-install.log" >&2; die "building tansu failed"; }
}

KAFKA_DIR="$STACK_DIR/kafka"
KAFKA_PID="$KAFKA_DIR/tansu.pid"
KAFKA_LOG="$KAFKA_DIR/tansu.log"

kafka_ready() { (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; }

# tansu 0.6 reads each fetched record's headers by (topition, offset_id) but
# its schema has no index there: every record fetched scans the whole header
# table, so consuming slows down with everything the broker ever stored
# (a 50k-message topic took over 10 minutes to read back). The index makes
# the lookup a b-tree search. Added while tansu is stopped; idempotent.
# tansu_header_index also compacts a file that is mostly free pages.
tansu_header_index() {
  python3 - "$KAFKA_DIR/tansu.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
if db.execute("select 1 from sqlite_master where type = 'table' and name = 'header'").fetchone():
    db.execute("create index if not exists header_topition_offset_id on header (topition, offset_id)")
    db.commit()
# Deleted topics leave their pages free and the file never shrinks: after a
# few benchmark runs it is mostly free pages. Compact it while it is.
pages = db.execute("pragma page_count").fetchone()[0]
free = db.execute("pragma freelist_count").fetchone()[0]
if pages > 25600 and free * 2 > pages:
    print(f"[stack] compacting tansu.db ({free} of {pages} pages free)", file=sys.stderr)
    db.execute("vacuum")
PY
}

tansu_start() {
  rm -f "$KAFKA_PID"
  free_port "$KAFKA_PORT" kafka
  log "starting kafka (tansu) on 127.0.0.1:$KAFKA_PORT"
  # tansu resolves the sqlite path relative to its working directory.
  (cd "$KAFKA_DIR" && exec setsid "$TANSU_BIN" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine "sqlite://tansu.db" >>"$KAFKA_LOG" 2>&1 </dev/null) &
  echo $! >"$KAFKA_PID"
  wait_for "kafka (tansu) on 127.0.0.1:$KAFKA_PORT" 30 "$KAFKA_LOG" kafka_ready
}

# tansu 0.6 can wedge with its port open, answering every request with
# Storage(UnableToSend) (see ../shared/ENVIRONMENT.md): a TCP check cannot
# see it, so the probe produces one message to a topic of its own and
# fetches it back. It runs on Python's confluent-kafka, installed once into
# a virtualenv in the cache (not an idempotent producer: tansu's
# idempotence check is what panics).
PROBE_VENV="$OUTBOX_CACHE/kafka-probe-venv"

kafka_probe_install() {
  if [ -x "$PROBE_VENV/bin/python" ] && "$PROBE_VENV/bin/python" -c 'import confluent_kafka' 2>/dev/null; then
    return 0
  fi
  log "installing the broker probe (python confluent-kafka) into $PROBE_VENV (once)"
  mkdir -p "$OUTBOX_CACHE"
  python3 -m venv "$PROBE_VENV" >/dev/null &&
    "$PROBE_VENV/bin/pip" install -q --disable-pip-version-check 'confluent-kafka>=2.3,<3' >/dev/null ||
    die "could not install confluent-kafka for the broker probe (pip); check the package index"
}

# Prints why the broker failed the produce-and-fetch probe; status 1 then.
kafka_probe() {
  "$PROBE_VENV/bin/python" - "127.0.0.1:$KAFKA_PORT" <<'PY'
import sys, uuid
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

brokers, topic = sys.argv[1], "outbox_stack_probe"
conf = {"bootstrap.servers": brokers, "log_level": 0, "socket.timeout.ms": 5000}
try:
    admin = AdminClient(conf)
    if topic not in admin.list_topics(timeout=5).topics:
        for future in admin.create_topics([NewTopic(topic, 1, 1)], operation_timeout=5).values():
            try:
                future.result(timeout=10)
            except KafkaException as err:
                if "exist" not in str(err).lower():
                    raise
    value = uuid.uuid4().hex.encode()
    delivered = {}
    def report(err, msg):
        delivered["err"], delivered["offset"] = err, (msg.offset() if msg is not None else None)
    producer = Producer({**conf, "enable.idempotence": False, "acks": "all", "message.timeout.ms": 8000})
    producer.produce(topic, value, on_delivery=report)
    producer.flush(10)
    if delivered.get("err") is not None or delivered.get("offset") is None:
        sys.exit(f"produce failed: {delivered.get('err') or 'no delivery report'}")
    consumer = Consumer({**conf, "group.id": "outbox-stack-probe", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, delivered["offset"])])
    message = consumer.poll(10)
    consumer.close()
    if message is None:
        sys.exit("fetch returned nothing within 10 s")
    if message.error() is not None or message.value() != value:
        sys.exit(f"fetch failed: {message.error() or 'another value came back'}")
except KafkaException as err:
    sys.exit(f"request failed: {err}")
PY
}

kafka_up() {
  tansu_install
  kafka_probe_install
  mkdir -p "$KAFKA_DIR"
  local pid why
  pid="$(cat "$KAFKA_PID" 2>/dev/null || true)"
  if pid_alive "$pid" && kafka_ready; then
    if why="$(kafka_probe 2>&1)"; then
      log "kafka (tansu) already running (pid $pid, port $KAFKA_PORT)"
      return 0
    fi
    log "kafka (tansu) pid $pid holds its port but is wedged ($why); restarting it"
    kafka_down
  fi
  if [ ! -f "$KAFKA_DIR/tansu.db" ]; then
    # tansu creates its schema on first start; stop it again to index it.
    tansu_start
    kafka_down
  fi
  tansu_header_index || die "cannot add the header index to $KAFKA_DIR/tansu.db"
  tansu_start
  local tries
  for tries in 1 2 3; do
    if why="$(kafka_probe 2>&1)"; then
      log "kafka ready"
      return 0
    fi
    sleep 1
  done
  die "kafka (tansu) started but failed the produce-and-fetch probe: $why (log: $KAFKA_LOG)"
}

kafka_down() {
  local pid
  pid="$(cat "$KAFKA_PID" 2>/dev/null || true)"
  if pid_alive "$pid"; then
    log "stopping kafka (pid $pid)"
    stop_pid "$pid" 10
  fi
  rm -f "$KAFKA_PID"
}

# --------------------------------------------------------------- ClickHouse

CH_DIR="$STACK_DIR/clickhouse"
CH_PID="$CH_DIR/clickhouse.pid"
CH_LOG="$CH_DIR/log/clickhouse-server.log"

ch_ready() {
  [ "$(curl -fsS --max-time 2 -u user:strongpassword \
    "http://127.0.0.1:$CH_HTTP_PORT/?query=SELECT%201" 2>/dev/null)" = "1" ]
}

ch_config() {
  mkdir -p "$CH_DIR"/{data,tmp,user_files,format_schemas,log}
  local listen='<listen_host>127.0.0.1</listen_host>'
  if [ -f /proc/net/if_inet6 ] && grep -q '00000000000000000000000000000001' /proc/net/if_inet6; then
    listen="$listen<listen_host>::1</listen_host>"
  fi
  cat >"$CH_DIR/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>$CH_DIR/log/clickhouse-server.log</log>
        <errorlog>$CH_DIR/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <http_port>$CH_HTTP_PORT</http_port>
    <tcp_port>$CH_TCP_PORT</tcp_port>
    <interserver_http_port>$CH_INTERSERVER_PORT</interserver_http_port>
    <https_port>$CH_HTTPS_PORT</https_port>
    <openSSL>
        <server>
            <certificateFile>$TLS_DIR/server.crt</certificateFile>
            <privateKeyFile>$TLS_DIR/server.key</privateKeyFile>
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>true</cacheSessions>
            <disableProtocols>sslv2,sslv3</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>
    $listen
    <listen_try>1</listen_try>
    <max_connections>1024</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>1073741824</uncompressed_cache_size>
    <mark_cache_size>1073741824</mark_cache_size>
    <path>$CH_DIR/data/</path>
    <tmp_path>$CH_DIR/tmp/</tmp_path>
    <user_files_path>$CH_DIR/user_files/</user_files_path>
    <format_schema_path>$CH_DIR/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
    <max_session_timeout>3600</max_session_timeout>
    <!-- A one-node cluster: the sink's Distributed tables are tested on it. -->
    <remote_servers>
        <outbox_local>
            <shard><replica><host>localhost</host><port>$CH_TCP_PORT</port></replica></shard>
        </outbox_local>
    </remote_servers>
    <default_session_timeout>60</default_session_timeout>
</yandex>
EOF
  write_clickhouse_users "$CH_DIR/users.xml" 10000000000
}

ch_up() {
  command -v clickhouse-server >/dev/null || apt_install clickhouse-server clickhouse-client
  local pid
  pid="$(cat "$CH_PID" 2>/dev/null || true)"
  tls_up
  if pid_alive "$pid" && ch_ready && [ -z "$(port_pid "$CH_HTTPS_PORT")" ]; then
    log "clickhouse runs without HTTPS (started by an older stack script): restarting it"
    ch_down
  fi
  if pid_alive "$pid" && ch_ready; then
    log "clickhouse already running (pid $pid, port $CH_HTTP_PORT)"
    return 0
  fi
  if pid_alive "$pid"; then
    # Started but not answering yet (it loads every table's parts first).
    ch_wait "$pid" "$CH_LOG"
    return 0
  fi
  rm -f "$CH_PID"
  ch_config
  free_port "$CH_HTTP_PORT" "clickhouse http"
  free_port "$CH_TCP_PORT" "clickhouse native"
  free_port "$CH_INTERSERVER_PORT" "clickhouse interserver"
  free_port "$CH_HTTPS_PORT" "clickhouse https"
  log "starting clickhouse on 127.0.0.1:$CH_HTTP_PORT (http) / $CH_TCP_PORT (native)"
  (cd "$CH_DIR" && exec setsid clickhouse-server --config-file="$CH_DIR/config.xml" \
    >>"$CH_DIR/log/stdout.log" 2>&1 </dev/null) &
  echo $! >"$CH_PID"
  ch_wait "$(cat "$CH_PID")" "$CH_DIR/log/stdout.log"
  log "clickhouse ready (user user)"
}

ch_down() {
  local pid
  pid="$(cat "$CH_PID" 2>/dev/null || true)"
  if pid_alive "$pid"; then
    log "stopping clickhouse (pid $pid)"
    stop_pid "$pid" 30
  fi
  rm -f "$CH_PID"
}

# -------------------------------------------------------------------- main

status() {
  local rc=0
  if pid_alive "$(pg_pid)" && pg_ready; then echo "postgres   up    pid $(pg_pid) 127.0.0.1:$PG_PORT"; else echo "postgres   down"; rc=1; fi
  local k c
  k="$(cat "$KAFKA_PID" 2>/dev/null || true)"
  c="$(cat "$CH_PID" 2>/dev/null || true)"
  local why=""
  if ! pid_alive "$k" || ! kafka_ready; then
    echo "kafka      down"; rc=1
  elif [ -x "$PROBE_VENV/bin/python" ] && ! why="$(kafka_probe 2>&1)"; then
    echo "kafka      wedged pid $k 127.0.0.1:$KAFKA_PORT (port open, produce/fetch probe failed: $why; 'scripts/stack.sh restart kafka')"; rc=1
  else
    echo "kafka      up    pid $k 127.0.0.1:$KAFKA_PORT (tansu)"
  fi
  if pid_alive "$c" && ch_ready; then echo "clickhouse up    pid $c 127.0.0.1:$CH_HTTP_PORT"; else echo "clickhouse down"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up)
    mkdir -p "$STACK_DIR"
    build_deps
    test_tools
    pg_up
    kafka_up
    ch_up
    ;;
  down)
    ch_down
    kafka_down
    pg_down
    ;;
  status) status ;;
  reset)
    "$0" down
    log "deleting $STACK_DIR"
    if [ -L "$STACK_DIR/postgres" ]; then rm -rf "$(dirname "$(readlink -f "$STACK_DIR/postgres")")"; fi
    rm -rf "$STACK_DIR"
    ;;
  restart)
    case "${2:-}" in
      postgres) pg_down; pg_up ;;
      kafka) kafka_down; kafka_up ;;
      clickhouse) ch_down; ch_up ;;
      *) die "usage: $0 restart postgres|kafka|clickhouse" ;;
    esac
    ;;
  crash)
    # SIGKILL a service and start it again: what a crash and a supervisor restart do.
    case "${2:-}" in
      postgres) pid="$(pg_pid)" ;;
      kafka) pid="$(cat "$KAFKA_PID" 2>/dev/null || true)" ;;
      clickhouse) pid="$(cat "$CH_PID" 2>/dev/null || true)" ;;
      *) die "usage: $0 crash postgres|kafka|clickhouse" ;;
    esac
    if pid_alive "$pid"; then
      log "killing ${2} (pid $pid) with SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      while pid_alive "$pid"; do sleep 0.1; done
    fi
    case "${2}" in
      postgres) pg_up ;;
      kafka) kafka_up ;;
      clickhouse) ch_up ;;
    esac
    ;;
  tansu-bin) tansu_install; echo "$TANSU_BIN" ;;
  *)
    echo "usage: $0 up|down|status|reset|restart SERVICE|crash SERVICE|tansu-bin" >&2
    exit 2
    ;;
esac
