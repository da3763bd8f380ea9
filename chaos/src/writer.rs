//! The writers: events committed in transactions, with a ledger.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::Event;
use outbox_pg::{Outbox, ValidOutboxConfig};
use uuid::Uuid;

use crate::KEYS;

/// What one writer writes, and how.
pub(crate) struct Writes {
    pub(crate) outbox: ValidOutboxConfig,
    pub(crate) ledger: String,
    pub(crate) topic: String,
    /// `Outbox::emit` into the WAL under the prefix `topic`, with each key's
    /// sequence numbers taken from a row of `<ledger>_seq` in the
    /// transaction (so several writers commit one key in sequence order),
    /// instead of `Outbox::enqueue` with sequence numbers of its own.
    pub(crate) table_free: bool,
    pub(crate) events_per_second: u32,
    pub(crate) seed: u64,
    /// A captured table (`id`, `n`) and its rows, one random row of which
    /// each transaction counts up (`n = n + 1`): its changes, and its
    /// initial load, are judged against its rows at the end.
    pub(crate) captured: Option<(String, i32)>,
    /// One transaction in this many is large (WAL runs): [`LARGE_EVENTS`]
    /// events, which the relay's session streams while it runs, and every
    /// other one a savepoint of [`DOOMED_EVENTS`] rolled back. 0: none.
    pub(crate) large_one_in: u32,
}

/// Events of a large transaction: far past the 64 kB of decoding memory
/// the WAL relay's session sets (see `fleet::relay_command`).
pub(crate) const LARGE_EVENTS: usize = 1000;

/// Events of a large transaction's savepoint that is rolled back.
const DOOMED_EVENTS: usize = 200;

/// Commits events of random keys in transactions of 1–10 events, a tenth of
/// them rolled back, each with a ledger row in the same transaction.
pub(crate) async fn write_events(
    pool: outbox_pg::deadpool_postgres::Pool,
    writes: Writes,
    writing: Arc<AtomicBool>,
    attempted: Arc<AtomicU64>,
    rolled_back: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let outbox = Outbox::new(&writes.outbox).with_message_prefix(writes.topic.clone());
    let mut rng = fastrand::Rng::with_seed(writes.seed ^ 0x5eed);
    let mut next_seq = vec![0i64; KEYS];
    let ledger = &writes.ledger;
    let insert = format!("INSERT INTO {ledger} (event_id) SELECT unnest($1::uuid[])");
    let take_seq = format!("UPDATE {ledger}_seq SET seq = seq + 1 WHERE key = $1 RETURNING seq");
    while writing.load(Ordering::SeqCst) {
        let large = writes.large_one_in > 0 && rng.u32(0..writes.large_one_in) == 0;
        let size = if large {
            LARGE_EVENTS
        } else {
            rng.usize(1..=10)
        };
        let mut keys: Vec<usize> = (0..size).map(|_| rng.usize(0..KEYS)).collect();
        // Half of the large transactions roll a savepoint of emitted events
        // back (read again unstreamed: docs/wal.md), half stream through.
        let doomed_keys: Vec<usize> = if large && rng.bool() {
            let mut keys: Vec<usize> = (0..DOOMED_EVENTS).map(|_| rng.usize(0..KEYS)).collect();
            keys.sort_unstable();
            keys
        } else {
            Vec::new()
        };
        let rollback = rng.u32(0..10) == 0;
        let result: anyhow::Result<()> = async {
            let mut client = pool.get().await?;
            let mut tx = client.transaction().await?;
            let mut events = Vec::with_capacity(size);
            if writes.table_free {
                // Keys locked in one order: two writers never deadlock.
                keys.sort_unstable();
                for key in &keys {
                    let key_id = *key as i32;
                    let seq: i64 = tx.query_one(&take_seq, &[&key_id]).await?.get(0);
                    events.push(event(&writes.topic, *key, seq));
                }
            } else {
                for key in &keys {
                    // The sequence grows on every attempt: a rolled-back
                    // event leaves a gap, never a repeat.
                    let seq = next_seq[*key];
                    next_seq[*key] += 1;
                    events.push(event(&writes.topic, *key, seq));
                }
            }
            if let Some((table, rows)) = &writes.captured {
                // After the sequence rows: locks taken in one order.
                let row = rng.i32(1..=*rows);
                tx.execute(
                    &format!("UPDATE {table} SET n = n + 1 WHERE id = $1"),
                    &[&row],
                )
                .await?;
            }
            let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
            tx.execute(&insert, &[&ids]).await?;
            if writes.table_free {
                outbox.emit(&tx, &events).await?;
            } else {
                outbox.enqueue(&tx, &events).await?;
            }
            if !doomed_keys.is_empty() {
                // Events, ledger rows and sequence numbers of a rolled back
                // savepoint: none may come out.
                let savepoint = tx.savepoint("doomed").await?;
                let mut doomed = Vec::with_capacity(doomed_keys.len());
                for key in &doomed_keys {
                    let key_id = *key as i32;
                    let seq: i64 = savepoint.query_one(&take_seq, &[&key_id]).await?.get(0);
                    doomed.push(event(&writes.topic, *key, seq));
                }
                let ids: Vec<Uuid> = doomed.iter().map(|e| e.id).collect();
                savepoint.execute(&insert, &[&ids]).await?;
                outbox.emit(&savepoint, &doomed).await?;
                savepoint.rollback().await?;
            }
            if rollback {
                tx.rollback().await?;
            } else {
                tx.commit().await?;
            }
            Ok(())
        }
        .await;
        let doomed = doomed_keys.len() as u64;
        attempted.fetch_add(size as u64 + doomed, Ordering::SeqCst);
        if result.is_ok() {
            rolled_back.fetch_add(
                if rollback { size as u64 } else { 0 } + doomed,
                Ordering::SeqCst,
            );
        }
        if result.is_err() {
            // PostgreSQL restarting: the outcome is in the ledger.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let pace =
            Duration::from_secs_f64(size as f64 / f64::from(writes.events_per_second.max(1)));
        tokio::time::sleep(pace).await;
    }
    Ok(())
}

fn event(topic: &str, key: usize, seq: i64) -> Event {
    Event::new(
        topic.to_string(),
        format!("{{\"key\":\"k{key}\",\"seq\":{seq}}}"),
    )
    .with_key(format!("k{key}"))
}
