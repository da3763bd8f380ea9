//! The WAL source: a reader task streams the slot and decodes ahead into a
//! bounded queue; claims take from the queue; acknowledgements move the
//! position the reader confirms to the server.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use outbox_core::{AckSummary, Claimed, Delivery, Event, Result, Source};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::info;
use uuid::Uuid;

use super::backfill::LoadState;
use super::reader::Reader;
use super::WalConfig;
use crate::{PgConfig, PgError, SqlName};

/// Longest a claim waits for a stream that has not reached the server's
/// end yet (a relay starting, or waiting for the slot) before it says
/// nothing is pending.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

pub(super) enum Item {
    Event(Event),
    /// Every event queued before it belongs to transactions that end at or
    /// before this position.
    Commit(u64),
    /// Every event queued before it that is a row of the initial load
    /// belongs to a chunk at or before this mark: once they are settled,
    /// the load is recorded as this far.
    LoadMark(LoadMark),
}

/// How far the initial load is once the rows before it are published.
#[derive(Debug, Clone)]
pub(super) struct LoadMark {
    pub(super) state: LoadState,
    /// The load's last chunk.
    pub(super) complete: bool,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) items: VecDeque<Item>,
    /// Events queued, or claimed and not yet acknowledged, in this generation.
    pub(super) outstanding: usize,
    /// Bumped by a rewind: claims of older generations confirm nothing.
    pub(super) generation: u64,
}

pub(super) struct Shared {
    pub(super) queue: Mutex<Queue>,
    pub(super) arrived: Notify,
    pub(super) space: Notify,
    /// The position every event before which is acknowledged: what the
    /// reader confirms to the server.
    pub(super) confirm: watch::Sender<u64>,
    /// Tells the reader to start over from the confirmed position.
    pub(super) rewind: watch::Sender<u64>,
    /// A permanent failure of the reader, returned by every claim.
    pub(super) fatal: Mutex<Option<String>>,
    /// Whether the stream reached the server's end (a keepalive outside a
    /// transaction) since its session started: before that, an empty queue
    /// does not mean nothing is pending.
    pub(super) caught_up: std::sync::atomic::AtomicBool,
    /// How far the initial load has read.
    pub(super) load: watch::Sender<LoadProgress>,
    /// Transactions streamed while they ran.
    pub(super) streamed: Arc<super::stream::Counters>,
}

/// Large transactions this source received while they ran
/// ([`WalConfig::stream_in_progress`](super::WalConfig::stream_in_progress)):
/// [`WalSource::streamed`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streamed {
    /// Streamed transactions that committed with changes or messages for
    /// this source, published at their commit.
    pub transactions: u64,
    /// Bytes of them written to spill files, past
    /// [`WalConfig::in_progress_memory`](super::WalConfig::in_progress_memory).
    pub spilled_bytes: u64,
    /// The current session receives large transactions while they run
    /// (false with protocol 1: asked for, before PostgreSQL 14, or for a
    /// while after a transaction that had to be read unstreamed).
    pub active: bool,
}

/// How far the initial load of a [`WalSource`] has read (for a progress
/// display: [`WalSource::load_progress`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadProgress {
    /// Rows of the captured tables queued for publishing so far, in this
    /// session (a row a change touched during its chunk is left to the
    /// change, and not counted).
    pub rows: u64,
    /// The rows of the tables this session loads, as the server's
    /// statistics estimate them (`pg_class.reltuples`; 0 when never
    /// analyzed).
    pub estimated: u64,
    /// Every row was read.
    pub done: bool,
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn advance(&self, lsn: u64) {
        self.confirm.send_if_modified(|current| {
            let raise = lsn > *current;
            if raise {
                *current = lsn;
            }
            raise
        });
    }

    /// Drops everything queued and makes the reader read again from the
    /// confirmed position: what an event that was not acknowledged needs,
    /// since a stream cannot leave one event pending and go on.
    pub(super) fn start_over(&self, queue: &mut Queue) {
        self.caught_up
            .store(false, std::sync::atomic::Ordering::SeqCst);
        queue.items.clear();
        queue.outstanding = 0;
        queue.generation += 1;
        let generation = queue.generation;
        self.rewind.send_replace(generation);
        self.space.notify_waiters();
    }
}

/// The source's handle on a claimed batch: where each of its transactions
/// ends. Dropped without an acknowledgement (the relay died mid-batch or
/// failed), it makes the stream start over from the confirmed position.
pub struct WalClaim {
    shared: Arc<Shared>,
    generation: u64,
    /// (events of the batch before it, commit end position).
    commits: Vec<(usize, u64)>,
    /// The last load mark in the batch, with the events before it.
    load_mark: Option<(usize, LoadMark)>,
    finished: bool,
}

impl std::fmt::Debug for WalClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalClaim")
            .field("generation", &self.generation)
            .field("commits", &self.commits.len())
            .finish()
    }
}

impl Drop for WalClaim {
    fn drop(&mut self) {
        if !self.finished {
            let mut queue = self.shared.lock();
            if queue.generation == self.generation {
                self.shared.start_over(&mut queue);
            }
        }
    }
}

/// A [`Source`] reading the write-ahead log through a logical replication
/// slot; see the [module](crate::wal) and `docs/wal.md`.
///
/// Only one session can stream a slot: every relay may run one, and those
/// that find the slot held wait and take over when it is released (at once
/// when its relay died, after the server's `wal_sender_timeout` when it
/// stalled).
pub struct WalSource {
    shared: Arc<Shared>,
    pool: Pool,
    dead_letter: SqlName,
    progress: SqlName,
    slot: String,
    stop: CancellationToken,
}

impl Drop for WalSource {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl WalSource {
    /// How far the initial load has read: stays at its default when the
    /// slot needs no load (it existed, or no table is loaded).
    pub fn load_progress(&self) -> watch::Receiver<LoadProgress> {
        self.shared.load.subscribe()
    }

    /// Starts reading: checks the server, creates what is missing (if
    /// allowed) and streams in a background task. `dead_letter_table` is the
    /// outbox's dead-letter table (`outbox_dead_letter` by default), where
    /// events the broker rejects for good and messages that are not events
    /// are kept with their reason.
    pub fn start(
        pg: &PgConfig,
        pool: Pool,
        config: WalConfig,
        dead_letter_table: &str,
    ) -> Result<Self, PgError> {
        config.validate()?;
        let dead_letter = SqlName::parse(dead_letter_table)?;
        let progress = SqlName::parse(&config.progress_table)?;
        let slot = config.slot.clone();
        let (confirm, _) = watch::channel(0);
        let (rewind, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            arrived: Notify::new(),
            space: Notify::new(),
            confirm,
            rewind,
            fatal: Mutex::new(None),
            caught_up: std::sync::atomic::AtomicBool::new(false),
            load: watch::channel(LoadProgress::default()).0,
            streamed: Arc::default(),
        });
        let stop = CancellationToken::new();
        let reader = Reader {
            shared: shared.clone(),
            pg: pg.clone(),
            pool: pool.clone(),
            config,
            dead_letter: dead_letter.clone(),
            stop: stop.clone(),
            unstreamed_until: std::sync::atomic::AtomicU64::new(0),
        };
        tokio::spawn(reader.run());
        Ok(Self {
            shared,
            pool,
            dead_letter,
            progress,
            slot,
            stop,
        })
    }

    /// What this source received of transactions streamed while they ran.
    pub fn streamed(&self) -> Streamed {
        use std::sync::atomic::Ordering::Relaxed;
        Streamed {
            transactions: self.shared.streamed.transactions.load(Relaxed),
            spilled_bytes: self.shared.streamed.spilled.load(Relaxed),
            active: self.shared.streamed.active.load(Relaxed),
        }
    }

    /// The position confirmed to the server so far (0 before the first).
    pub fn confirmed(&self) -> u64 {
        *self.shared.confirm.borrow()
    }

    /// The reader's permanent failure, as the error every claim returns.
    fn fatal(&self) -> Option<outbox_core::Error> {
        let fatal = self.shared.fatal.lock().unwrap_or_else(|p| p.into_inner());
        fatal
            .as_ref()
            .map(|text| outbox_core::Error::permanent(outbox_core::Stage::Source, text.clone()))
    }

    /// Records how far the initial load is published: a relay that starts
    /// after this goes on from there (or streams on, once it is complete).
    async fn record_load(&self, mark: &LoadMark) -> Result<(), PgError> {
        let client = self.pool.get().await.map_err(|e| PgError::Connect {
            target: "the WAL progress table".into(),
            detail: e.to_string(),
            retryable: true,
        })?;
        let state = serde_json::to_string(&mark.state).unwrap_or_default();
        client
            .execute(
                &format!(
                    "UPDATE {} SET loaded = $2, load_state = $3::text::jsonb WHERE slot = $1",
                    self.progress
                ),
                &[&self.slot, &mark.complete, &state],
            )
            .await
            .map_err(|e| PgError::query("record the initial load", e))?;
        if mark.complete {
            info!(slot = %self.slot, "initial load published");
        }
        Ok(())
    }

    async fn dead_letter(&self, events: &[(&Event, &str)]) -> Result<(), PgError> {
        if events.is_empty() {
            return Ok(());
        }
        let client = self.pool.get().await.map_err(|e| PgError::Connect {
            target: "the dead-letter table".into(),
            detail: e.to_string(),
            retryable: true,
        })?;
        insert_dead_letters(&client, &self.dead_letter, events).await
    }
}

pub(super) async fn insert_dead_letters(
    client: &deadpool_postgres::Client,
    table: &SqlName,
    events: &[(&Event, &str)],
) -> Result<(), PgError> {
    let sql = format!(
        "INSERT INTO {table} (event_id, topic, key, payload, headers, created_at, attempts, reason, origin) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[], $5::jsonb[], $6::timestamptz[], \
                              $7::int[], $8::text[], $9::text[])"
    );
    let ids: Vec<Uuid> = events.iter().map(|(e, _)| e.id).collect();
    let topics: Vec<&str> = events.iter().map(|(e, _)| e.topic.as_str()).collect();
    let keys: Vec<Option<&[u8]>> = events.iter().map(|(e, _)| e.key.as_deref()).collect();
    let payloads: Vec<&[u8]> = events.iter().map(|(e, _)| &e.payload[..]).collect();
    let headers: Vec<serde_json::Value> = events
        .iter()
        .map(|(e, _)| crate::enqueue::headers_json(e))
        .collect();
    let created: Vec<std::time::SystemTime> = events.iter().map(|(e, _)| e.created_at).collect();
    let attempts: Vec<i32> = vec![1; events.len()];
    let reasons: Vec<&str> = events.iter().map(|(_, r)| *r).collect();
    let origins: Vec<&str> = vec!["wal"; events.len()];
    client
        .execute(
            &sql,
            &[
                &ids, &topics, &keys, &payloads, &headers, &created, &attempts, &reasons, &origins,
            ],
        )
        .await
        .map_err(|e| PgError::query("dead-letter (wal)", e))?;
    Ok(())
}

#[async_trait]
impl Source for WalSource {
    type Claim = WalClaim;

    async fn claim(&self, max_events: usize) -> Result<Option<Claimed<WalClaim>>> {
        if let Some(err) = self.fatal() {
            return Err(err);
        }
        // A relay that stops once nothing is pending (`--drain`) must not
        // stop before its stream read what the WAL already holds.
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        while !self
            .shared
            .caught_up
            .load(std::sync::atomic::Ordering::SeqCst)
            && tokio::time::Instant::now() < deadline
            && self.fatal().is_none()
        {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self
                .shared
                .lock()
                .items
                .iter()
                .any(|i| matches!(i, Item::Event(_)))
            {
                break;
            }
            let _ = tokio::time::timeout_at(deadline, arrived).await;
        }
        let (events, commits, load_mark, generation) = {
            let mut queue = self.shared.lock();
            let mut events = Vec::new();
            let mut commits = Vec::new();
            let mut load_mark = None;
            while let Some(item) = queue.items.front() {
                match item {
                    Item::Event(_) if events.len() >= max_events => break,
                    Item::Event(_) => {
                        if let Some(Item::Event(event)) = queue.items.pop_front() {
                            events.push(event);
                        }
                    }
                    Item::Commit(lsn) => {
                        commits.push((events.len(), *lsn));
                        queue.items.pop_front();
                    }
                    Item::LoadMark(_) => {
                        if let Some(Item::LoadMark(mark)) = queue.items.pop_front() {
                            load_mark = Some((events.len(), mark));
                        }
                    }
                }
            }
            (events, commits, load_mark, queue.generation)
        };
        self.shared.space.notify_waiters();
        if events.is_empty() {
            // Only transaction ends: everything before them is acknowledged.
            if let Some((_, mark)) = &load_mark {
                self.record_load(mark).await?;
            }
            if let Some((_, lsn)) = commits.last() {
                self.shared.advance(*lsn);
            }
            return Ok(None);
        }
        Ok(Some(Claimed {
            events,
            claim: WalClaim {
                shared: self.shared.clone(),
                generation,
                commits,
                load_mark,
                finished: false,
            },
        }))
    }

    async fn acknowledge(
        &self,
        mut claimed: Claimed<WalClaim>,
        deliveries: &[Delivery],
    ) -> Result<AckSummary> {
        // The stream can only move past a prefix: up to the first event the
        // broker did not take (or that has no answer), everything is settled.
        let settled = (0..claimed.events.len())
            .position(|i| {
                !matches!(
                    deliveries.get(i),
                    Some(Delivery::Acknowledged(_) | Delivery::Rejected(_))
                )
            })
            .unwrap_or(claimed.events.len());
        // Only those: an event past the first failure is read and published
        // again, and dead-lettered then if the broker still refuses it.
        let rejected: Vec<(&Event, &str)> = claimed.events[..settled]
            .iter()
            .zip(deliveries)
            .filter_map(|(event, delivery)| match delivery {
                Delivery::Rejected(reason) => Some((event, reason.as_str())),
                _ => None,
            })
            .collect();
        // Kept before the position moves past them; on failure the claim is
        // dropped, and the stream reads them again.
        self.dead_letter(&rejected).await?;
        let summary = AckSummary {
            completed: deliveries
                .iter()
                .take(settled)
                .filter(|d| d.is_acknowledged())
                .count(),
            dead_lettered: rejected.len(),
            released: claimed.events.len() - settled,
        };
        let current = self.shared.lock().generation == claimed.claim.generation;
        if let Some((_, mark)) = claimed
            .claim
            .load_mark
            .as_ref()
            .filter(|(before, _)| current && *before <= settled)
        {
            // Before any position past its chunk is confirmed.
            self.record_load(mark).await?;
        }
        let claim = &mut claimed.claim;
        claim.finished = true;
        let mut queue = self.shared.lock();
        if queue.generation != claim.generation {
            return Ok(AckSummary {
                completed: 0,
                dead_lettered: summary.dead_lettered,
                released: claimed.events.len(),
            });
        }
        if let Some((_, lsn)) = claim
            .commits
            .iter()
            .rev()
            .find(|(before, _)| *before <= settled)
        {
            self.shared.advance(*lsn);
        }
        if settled < claimed.events.len() {
            self.shared.start_over(&mut queue);
        } else {
            queue.outstanding = queue.outstanding.saturating_sub(claimed.events.len());
        }
        Ok(summary)
    }

    async fn wait_for_events(&self, timeout: Duration) -> Result<()> {
        let arrived = self.shared.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let ready = {
            let queue = self.shared.lock();
            queue.items.iter().any(|i| matches!(i, Item::Event(_)))
        };
        if !ready && self.fatal().is_none() {
            let _ = tokio::time::timeout(timeout, arrived).await;
        }
        Ok(())
    }
}
