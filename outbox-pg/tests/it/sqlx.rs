//! `Outbox::enqueue_sqlx` against a real PostgreSQL (cargo feature `sqlx`,
//! on in `make test`):
//! a service on sqlx enqueues in its own transaction and a relay on the
//! crate's own driver claims exactly what was committed.

use std::time::Duration;

use outbox_core::{Event, Source};
use outbox_pg::{migrate, Outbox, OutboxConfig, PgOutboxSource};

use super::pg_config;

/// Invariant (atomic enqueue, no loss, no phantom): what a sqlx transaction
/// commits is claimed whole, with key, headers and payload; what it rolls
/// back never appears; a second event with the same id fails the caller's
/// transaction with a permanent error.
#[tokio::test]
async fn sqlx_transactions_enqueue_atomically() {
    let pg = pg_config();
    let config = OutboxConfig {
        table: "t_sqlx".into(),
        dead_letter_table: "t_sqlx_dead".into(),
        ..OutboxConfig::default()
    }
    .validate()
    .unwrap();
    let pool = pg.create_pool().unwrap();
    {
        let client = pool.get().await.unwrap();
        client
            .batch_execute("DROP TABLE IF EXISTS t_sqlx; DROP TABLE IF EXISTS t_sqlx_dead;")
            .await
            .unwrap();
        migrate(&client, &config).await.unwrap();
    }
    let url = format!(
        "postgres://{}:{}@{}:{}/{}?sslmode=disable",
        pg.user, pg.password, pg.host, pg.port, pg.dbname
    );
    let sqlx_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .unwrap();
    let outbox = Outbox::new(&config);

    let committed: Vec<Event> = (0..5)
        .map(|i| {
            Event::new("sqlx_topic", format!("c{i}"))
                .with_key("k")
                .with_header("source", "sqlx")
        })
        .collect();
    let mut tx = sqlx_pool.begin().await.unwrap();
    assert_eq!(outbox.enqueue_sqlx(&mut tx, &committed).await.unwrap(), 5);
    tx.commit().await.unwrap();

    let rolled_back: Vec<Event> = (0..3)
        .map(|i| Event::new("sqlx_topic", format!("r{i}")))
        .collect();
    let mut tx = sqlx_pool.begin().await.unwrap();
    assert_eq!(outbox.enqueue_sqlx(&mut tx, &rolled_back).await.unwrap(), 3);
    tx.rollback().await.unwrap();

    let mut tx = sqlx_pool.begin().await.unwrap();
    let err = outbox
        .enqueue_sqlx(&mut tx, &committed[..1])
        .await
        .expect_err("the event id is already in the outbox");
    println!("duplicate id: {err}");
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("23505"), "{err}");
    tx.rollback().await.unwrap();

    let source = PgOutboxSource::new(pool.clone(), "sqlx", config);
    let claimed = source.claim(100).await.unwrap().expect("events pending");
    println!("committed=5 rolled_back=3 claimed={}", claimed.events.len());
    let ids: Vec<_> = claimed.events.iter().map(|e| e.id).collect();
    assert_eq!(ids, committed.iter().map(|e| e.id).collect::<Vec<_>>());
    for (got, sent) in claimed.events.iter().zip(&committed) {
        assert_eq!(got.payload, sent.payload);
        assert_eq!(got.key, sent.key);
        assert_eq!(got.headers, sent.headers);
        assert_eq!(got.topic, "sqlx_topic");
    }
}
