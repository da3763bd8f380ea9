#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

use std::path::PathBuf;

pub mod cpu;
mod process;
pub use process::{Launch, Process};

use outbox_kafka::KafkaConfig;
use outbox_pg::PgConfig;
use sink_clickhouse::ClickHouseConfig;
use uuid::Uuid;

/// The stack's PostgreSQL (`OUTBOX_PG_HOST`, `OUTBOX_PG_PORT`).
pub fn pg() -> PgConfig {
    let defaults = PgConfig::default();
    PgConfig {
        host: std::env::var("OUTBOX_PG_HOST").unwrap_or(defaults.host.clone()),
        port: std::env::var("OUTBOX_PG_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(defaults.port),
        ..defaults
    }
}

/// The stack's Kafka bootstrap servers (`OUTBOX_KAFKA_BROKERS`).
pub fn brokers() -> String {
    std::env::var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|_| KafkaConfig::default().brokers)
}

/// The adapter's defaults on the stack's broker.
pub fn kafka() -> KafkaConfig {
    KafkaConfig {
        brokers: brokers(),
        ..KafkaConfig::default()
    }
}

/// The stack's ClickHouse HTTP endpoint (`OUTBOX_CLICKHOUSE_URL`).
pub fn clickhouse_url() -> String {
    std::env::var("OUTBOX_CLICKHOUSE_URL").unwrap_or_else(|_| ClickHouseConfig::default().url)
}

/// The sink's defaults on the stack's ClickHouse.
pub fn clickhouse() -> ClickHouseConfig {
    ClickHouseConfig {
        url: clickhouse_url(),
        ..ClickHouseConfig::default()
    }
}

/// `{prefix}_{name}_{12 hex digits}`: unique to this run, and safe as a
/// table, topic or group name when `prefix` and `name` are.
///
/// ```
/// let a = test_support::unique("it", "claims");
/// assert!(a.starts_with("it_claims_") && a.len() == "it_claims_".len() + 12);
/// assert_ne!(a, test_support::unique("it", "claims"));
/// ```
pub fn unique(prefix: &str, name: &str) -> String {
    let id = Uuid::now_v7().simple().to_string();
    format!("{prefix}_{name}_{}", &id[20..])
}

/// A file of the stack's test CA and certificates (`OUTBOX_TLS_DIR`, the
/// checkout's `.stack/tls` otherwise, where `scripts/stack.sh up` makes them).
pub fn tls_file(name: &str) -> PathBuf {
    let dir = std::env::var("OUTBOX_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.stack/tls")));
    dir.join(name)
}

/// Drops the replication slot `slot` when it exists: ends the session that
/// streams it first (a relay just killed may keep it active for a moment;
/// one stopped keeps it until `wal_sender_timeout`), and tries again for up
/// to 30 s. A slot left behind holds its WAL and, on PostgreSQL 15 and
/// older, its `catalog_xmin` stops every B-tree of the server from reusing
/// deleted pages (which `outbox-pg/tests/retention.rs` measures), so a
/// test that cannot drop its slot fails instead of leaking it.
pub async fn drop_slot(
    db: &outbox_pg::deadpool_postgres::tokio_postgres::Client,
    slot: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        db.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await?;
        let dropped = db
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        match dropped {
            Ok(_) => return Ok(()),
            Err(err) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("the replication slot {slot} could not be dropped: {err}")
            }
            // Still active: the terminated session is ending, or a relay
            // took the slot back meanwhile.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}
