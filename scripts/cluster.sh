#!/usr/bin/env bash
# A replicated ClickHouse cluster for the cluster tests, beside the local
# stack: ZooKeeper and three more ClickHouse servers, two replicas of shard 1
# and one of shard 2, in the cluster `outbox_replicated` (and shard 1 alone
# as `outbox_shard1`, where every shard has two replicas). Data under
# .stack/cluster/ in the checkout.
#
#   scripts/cluster.sh up       install what is missing, start what is down, wait until each answers
#   scripts/cluster.sh down     stop the servers it started
#   scripts/cluster.sh status   say what runs
#   scripts/cluster.sh reset    down, then delete .stack/cluster/
#   scripts/cluster.sh stop-replica N / start-replica N   (N = 1, 2, 3)
#
# Ports: ZooKeeper 2182; server N: HTTP 813N, native 903N, interserver 904N.
# ClickHouse 18.16 replicates through ZooKeeper (its <zookeeper> section).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${STACK_DIR:-$ROOT/.stack}/cluster"
ZK_PORT="${ZK_PORT:-2182}"
ZK_DIR="$DIR/zookeeper"

# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

install_packages() {
  local missing=()
  [ -f /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
  command -v java >/dev/null || missing+=(default-jre-headless)
  command -v clickhouse-server >/dev/null || missing+=(clickhouse-server clickhouse-client)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
    as_root apt-get update -q >/dev/null 2>&1 || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null ||
      die "could not install ${missing[*]} with apt-get"
  }
}

# Serving requests, not only running: `ruok` answers imok while ZooKeeper
# still loads its database, and a ClickHouse server whose first session
# handshake fails then exits at start.
zk_ready() {
  local answer
  answer="$( (exec 3<>"/dev/tcp/127.0.0.1/$ZK_PORT" && printf 'srvr' >&3 && timeout 2 cat <&3) 2>/dev/null || true)"
  [[ "$answer" == *"Mode: standalone"* ]]
}

zk_up() {
  mkdir -p "$ZK_DIR/data"
  if pid_alive "$(cat "$ZK_DIR/pid" 2>/dev/null || true)" && zk_ready; then return 0; fi
  free_port "$ZK_PORT" zookeeper
  log "starting zookeeper on 127.0.0.1:$ZK_PORT"
  (cd "$ZK_DIR" && exec setsid java -Xmx256m -Dzookeeper.4lw.commands.whitelist=srvr \
    -cp /etc/zookeeper/conf_example:/usr/share/java/zookeeper.jar \
    org.apache.zookeeper.server.ZooKeeperServerMain "$ZK_PORT" "$ZK_DIR/data" \
    >>"$ZK_DIR/zookeeper.log" 2>&1 </dev/null) &
  echo $! >"$ZK_DIR/pid"
  local i
  for ((i = 0; i < 120; i++)); do zk_ready && return 0; sleep 0.25; done
  tail -n 20 "$ZK_DIR/zookeeper.log" >&2 || true
  die "zookeeper did not answer on 127.0.0.1:$ZK_PORT"
}

# Server N (1..3): shard and replica names for its macros.
shard_of() { case "$1" in 1 | 2) echo 01 ;; *) echo 02 ;; esac; }
http_port() { echo "813$1"; }
tcp_port() { echo "903$1"; }

ch_ready() {
  [ "$(curl -fsS --max-time 2 -u user:strongpassword \
    "http://127.0.0.1:$(http_port "$1")/?query=SELECT%201" 2>/dev/null)" = "1" ]
}

replica_xml() {
  printf '<replica><host>127.0.0.1</host><port>%s</port><user>user</user><password>strongpassword</password></replica>' "$(tcp_port "$1")"
}

ch_config() {
  local n="$1" dir="$DIR/ch$1"
  mkdir -p "$dir"/{data,tmp,user_files,format_schemas,log}
  cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>$dir/log/clickhouse-server.log</log>
        <errorlog>$dir/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <http_port>$(http_port "$n")</http_port>
    <tcp_port>$(tcp_port "$n")</tcp_port>
    <interserver_http_port>904$n</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <listen_host>127.0.0.1</listen_host>
    <max_connections>256</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>50</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <zookeeper>
        <node><host>127.0.0.1</host><port>$ZK_PORT</port></node>
        <session_timeout_ms>10000</session_timeout_ms>
    </zookeeper>
    <macros>
        <shard>$(shard_of "$n")</shard>
        <replica>ch$n</replica>
    </macros>
    <remote_servers>
        <outbox_replicated>
            <shard><internal_replication>true</internal_replication>$(replica_xml 1)$(replica_xml 2)</shard>
            <shard><internal_replication>true</internal_replication>$(replica_xml 3)</shard>
        </outbox_replicated>
        <outbox_shard1>
            <shard><internal_replication>true</internal_replication>$(replica_xml 1)$(replica_xml 2)</shard>
        </outbox_shard1>
    </remote_servers>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
</yandex>
EOF
  write_clickhouse_users "$dir/users.xml" 4000000000
}

ch_start() {
  local n="$1" dir="$DIR/ch$1" i
  if pid_alive "$(cat "$dir/pid" 2>/dev/null || true)" && ch_ready "$n"; then return 0; fi
  ch_config "$n"
  local port
  for port in "$(http_port "$n")" "$(tcp_port "$n")" "904$n"; do free_port "$port" "clickhouse ch$n"; done
  log "starting clickhouse ch$n (shard $(shard_of "$n")) on 127.0.0.1:$(http_port "$n")"
  (cd "$dir" && exec setsid clickhouse-server --config-file="$dir/config.xml" \
    >>"$dir/log/stdout.log" 2>&1 </dev/null) &
  echo $! >"$dir/pid"
}

ch_wait() {
  local n="$1" dir="$DIR/ch$1" i
  for ((i = 0; i < 1200; i++)); do
    ch_ready "$n" && return 0
    pid_alive "$(cat "$dir/pid" 2>/dev/null || true)" || break
    sleep 0.25
  done
  tail -n 20 "$dir/log/clickhouse-server.err.log" "$dir/log/stdout.log" >&2 2>/dev/null || true
  die "clickhouse ch$n did not come up on 127.0.0.1:$(http_port "$n")"
}

ch_stop() {
  local dir="$DIR/ch$1"
  stop_pid "$(cat "$dir/pid" 2>/dev/null || true)" 30
  rm -f "$dir/pid"
}

up() {
  install_packages
  zk_up
  for n in 1 2 3; do ch_start "$n"; done
  for n in 1 2 3; do ch_wait "$n"; done
  log "cluster outbox_replicated ready: shard 01 = ch1 :8131, ch2 :8132; shard 02 = ch3 :8133"
}

down() {
  for n in 1 2 3; do ch_stop "$n"; done
  stop_pid "$(cat "$ZK_DIR/pid" 2>/dev/null || true)"
  rm -f "$ZK_DIR/pid"
}

status() {
  local rc=0
  if zk_ready; then echo "zookeeper  up    127.0.0.1:$ZK_PORT"; else echo "zookeeper  down"; rc=1; fi
  for n in 1 2 3; do
    if ch_ready "$n"; then echo "ch$n        up    127.0.0.1:$(http_port "$n") (shard $(shard_of "$n"))"; else echo "ch$n        down"; rc=1; fi
  done
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  reset) down; rm -rf "$DIR" ;;
  stop-replica) ch_stop "${2:?replica number}" ;;
  start-replica) ch_start "${2:?replica number}"; ch_wait "$2" ;;
  *) echo "usage: $0 up|down|status|reset|stop-replica N|start-replica N" >&2; exit 2 ;;
esac
