//! The writer: events committed in transactions, with a ledger.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::Event;
use outbox_pg::{Outbox, ValidOutboxConfig};
use uuid::Uuid;

use crate::KEYS;

/// Commits events of random keys in transactions of 1–10 events, a tenth of
/// them rolled back, each with a ledger row in the same transaction.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn write_events(
    pool: outbox_pg::deadpool_postgres::Pool,
    config: ValidOutboxConfig,
    ledger: String,
    topic: String,
    events_per_second: u32,
    seed: u64,
    writing: Arc<AtomicBool>,
    attempted: Arc<AtomicU64>,
    rolled_back: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let outbox = Outbox::new(&config);
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let mut next_seq = vec![0i64; KEYS];
    let insert = format!("INSERT INTO {ledger} (event_id) SELECT unnest($1::uuid[])");
    while writing.load(Ordering::SeqCst) {
        let size = rng.usize(1..=10);
        let events: Vec<Event> = (0..size)
            .map(|_| {
                let key = rng.usize(0..KEYS);
                // The sequence grows on every attempt: a rolled-back event
                // leaves a gap, never a repeat.
                let seq = next_seq[key];
                next_seq[key] += 1;
                Event::new(
                    topic.clone(),
                    format!("{{\"key\":\"k{key}\",\"seq\":{seq}}}"),
                )
                .with_key(format!("k{key}"))
            })
            .collect();
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let rollback = rng.u32(0..10) == 0;
        let result: anyhow::Result<()> = async {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            tx.execute(&insert, &[&ids]).await?;
            outbox.enqueue(&tx, &events).await?;
            if rollback {
                tx.rollback().await?;
            } else {
                tx.commit().await?;
            }
            Ok(())
        }
        .await;
        attempted.fetch_add(size as u64, Ordering::SeqCst);
        if result.is_ok() && rollback {
            rolled_back.fetch_add(size as u64, Ordering::SeqCst);
        }
        if result.is_err() {
            // PostgreSQL restarting: the outcome is in the ledger.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let pace = Duration::from_secs_f64(size as f64 / f64::from(events_per_second.max(1)));
        tokio::time::sleep(pace).await;
    }
    Ok(())
}
