//! Helpers shared by the test binaries of outbox-pg.

use outbox_core::{Delivery, Position};
use outbox_pg::{migrate, OutboxConfig, PgConfig, ValidOutboxConfig};

/// The stack's PostgreSQL; override with `OUTBOX_PG_HOST` / `OUTBOX_PG_PORT`.
pub fn pg_config() -> PgConfig {
    test_support::pg()
}

/// Tables `t_<name>` and `t_<name>_dead`.
pub fn outbox_config(name: &str) -> OutboxConfig {
    OutboxConfig {
        table: format!("t_{name}"),
        dead_letter_table: format!("t_{name}_dead"),
        ..OutboxConfig::default()
    }
}

/// A fresh pool and freshly created outbox tables for one test.
pub async fn setup(name: &str) -> (deadpool_postgres::Pool, ValidOutboxConfig) {
    setup_with(name, outbox_config(name)).await
}

/// [`setup`] with a configuration of the test's own (tables `t_<name>`).
pub async fn setup_with(
    name: &str,
    config: OutboxConfig,
) -> (deadpool_postgres::Pool, ValidOutboxConfig) {
    let pool = pg_config().create_pool().unwrap();
    let config = config.validate().unwrap();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS t_{name}; DROP TABLE IF EXISTS t_{name}_dead;"
        ))
        .await
        .unwrap();
    migrate(&client, &config).await.unwrap();
    (pool, config)
}

/// The broker's acknowledgement at `offset` of partition 0.
pub fn ack(offset: i64) -> Delivery {
    Delivery::Acknowledged(Position {
        partition: 0,
        offset,
    })
}
