# Sourced by stack.sh and cluster.sh: helpers for the servers of the local
# stack (they call the sourcing script's log and die).

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

# pid of the process listening on a TCP port, empty when free.
port_pid() {
  ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Stops a pid: SIGTERM, then SIGKILL after $2 seconds (default 20).
stop_pid() {
  local pid="$1" wait_s="${2:-20}" i
  pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < wait_s * 10; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  log "pid $pid did not stop within ${wait_s}s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.2
}

# Frees a port held by a stale server of ours (an earlier checkout or run);
# refuses to touch anything else.
free_port() {
  local port="$1" name="$2" pid comm
  pid="$(port_pid "$port")"
  [ -z "$pid" ] && return 0
  comm="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  case "$comm" in
    *postgres* | *tansu* | *clickhouse* | *ZooKeeperServerMain*)
      log "port $port ($name) is held by a server left by an earlier run (pid $pid: ${comm:0:80}); stopping it"
      if [[ "$comm" == *postgres* ]] && ls /etc/postgresql/*/main >/dev/null 2>&1; then
        # The Debian cluster, if that is what holds it, is stopped the Debian way.
        for v in $(ls /etc/postgresql); do
          pg_ctlcluster --skip-systemctl-redirect "$v" main stop >/dev/null 2>&1 || true
        done
      fi
      stop_pid "$pid" 30
      [ -z "$(port_pid "$port")" ] || die "port $port ($name) is still held after stopping pid $pid"
      ;;
    *)
      die "port $port ($name) is held by another program (pid $pid: ${comm:0:80}); stop it or set the port variable"
      ;;
  esac
}

# The users.xml of every ClickHouse server of the local stack (user `user` /
# `strongpassword`, and `default` without a password, from loopback only).
#   write_clickhouse_users FILE MAX_MEMORY_BYTES
write_clickhouse_users() {
  cat >"$1" <<EOF_USERS
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>$2</max_memory_usage>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>::1</ip><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <user>
            <password>strongpassword</password>
            <networks><ip>::1</ip><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </user>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF_USERS
}
