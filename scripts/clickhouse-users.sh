# Sourced by stack.sh and cluster.sh: the users.xml of every ClickHouse
# server of the local stack (user `user` / `strongpassword`, and `default`
# without a password, both from loopback only).
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
