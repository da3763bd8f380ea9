//! The WAL source: a reader task streams the slot and decodes ahead into a
//! bounded queue; claims take from the queue; acknowledgements move the
//! position the reader confirms to the server.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use outbox_core::{system_time_to_ms, AckSummary, Claimed, Delivery, Event, Result, Source};
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::backfill::{Backfill, Decision, LoadState, LOAD_PREFIX};
use super::change::{lsn_text, Decoded, Decoder, Routing};
use super::load::{Chunk, Loader};
use super::WalConfig;
use crate::{PgConfig, PgError, SqlName};

/// Session settings that make the server's text output of values the one
/// `value::to_json` reads.
const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=iso_8601 \
                               -c bytea_output=hex -c extra_float_digits=3";

/// How many status intervals between two readings of the slot's gauges.
const SLOT_REPORT_TICKS: u64 = 5;

/// Longest a claim waits for a stream that has not reached the server's
/// end yet (a relay starting, or waiting for the slot) before it says
/// nothing is pending.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// The least an idle stream's confirmed position moves at a time (bytes of
/// WAL): far below a WAL segment (16 MiB), so an idle capture still pins
/// none, and far above the record of one position.
const IDLE_CONFIRM_STEP: u64 = 64 * 1024;

enum Item {
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
struct LoadMark {
    state: LoadState,
    /// The load's last chunk.
    complete: bool,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Events queued, or claimed and not yet acknowledged, in this generation.
    outstanding: usize,
    /// Bumped by a rewind: claims of older generations confirm nothing.
    generation: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    arrived: Notify,
    space: Notify,
    /// The position every event before which is acknowledged: what the
    /// reader confirms to the server.
    confirm: watch::Sender<u64>,
    /// Tells the reader to start over from the confirmed position.
    rewind: watch::Sender<u64>,
    /// A permanent failure of the reader, returned by every claim.
    fatal: Mutex<Option<String>>,
    /// Whether the stream reached the server's end (a keepalive outside a
    /// transaction) since its session started: before that, an empty queue
    /// does not mean nothing is pending.
    caught_up: std::sync::atomic::AtomicBool,
    /// How far the initial load has read.
    load: watch::Sender<LoadProgress>,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn advance(&self, lsn: u64) {
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
    fn start_over(&self, queue: &mut Queue) {
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
        });
        let stop = CancellationToken::new();
        let reader = Reader {
            shared: shared.clone(),
            pg: pg.clone(),
            pool: pool.clone(),
            config,
            dead_letter: dead_letter.clone(),
            stop: stop.clone(),
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

async fn insert_dead_letters(
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

/// Why a session ended.
enum Ended {
    /// An acknowledgement asked to read again from the confirmed position.
    Rewind,
    /// The relay is stopping.
    Stopped,
}

struct Reader {
    shared: Arc<Shared>,
    pg: PgConfig,
    pool: Pool,
    config: WalConfig,
    dead_letter: SqlName,
    stop: CancellationToken,
}

impl Reader {
    async fn run(self) {
        let mut backoff =
            outbox_core::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut waiting_since: Option<Instant> = None;
        loop {
            let result = self.session(&mut waiting_since).await;
            match result {
                Ok(Ended::Stopped) => return,
                Ok(Ended::Rewind) => {
                    debug!(slot = %self.config.slot, "WAL stream starts over from the confirmed position");
                    backoff.reset();
                }
                Err(SessionError::Held(holder)) => {
                    if waiting_since.is_none() {
                        info!(slot = %self.config.slot, holder = %holder,
                              "the replication slot is streamed by another relay: this one waits to take over");
                        waiting_since = Some(Instant::now());
                    }
                    if self.pause(self.config.standby_retry).await {
                        return;
                    }
                }
                Err(SessionError::Failed(err)) if err.is_retryable() => {
                    let delay = backoff.next_delay();
                    warn!(slot = %self.config.slot, error = %err, retry_in_ms = delay.as_millis() as u64,
                          "WAL stream interrupted; reading again from the confirmed position");
                    if self.pause(delay).await {
                        return;
                    }
                }
                Err(SessionError::Failed(err)) => {
                    tracing::error!(slot = %self.config.slot, error = %err, "WAL source stopped");
                    *self.shared.fatal.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(err.to_string());
                    self.shared.arrived.notify_waiters();
                    return;
                }
            }
        }
    }

    /// Sleeps `delay`; true when the relay is stopping.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }

    async fn session(&self, waiting_since: &mut Option<Instant>) -> Result<Ended, SessionError> {
        self.shared
            .caught_up
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let prepared = self.prepare().await?;
        // Everything from the last session is gone: read from the slot's position on.
        let generation = {
            let mut queue = self.shared.lock();
            queue.items.clear();
            queue.outstanding = 0;
            queue.generation
        };
        let start = prepared.at;
        self.shared.advance(start);
        let mut client = ReplicationClient::connect_gated(self.replication_config(start))
            .await
            .map_err(classify)?;
        let system = client.identify_system().await.map_err(classify)?;
        client.start().await.map_err(classify)?;
        client.wait_started().await.map_err(classify)?;
        if let Some(since) = waiting_since.take() {
            info!(slot = %self.config.slot, waited_ms = since.elapsed().as_millis() as u64,
                  "took over the replication slot");
        }
        info!(slot = %self.config.slot, from = %lsn_text(start), "streaming the write-ahead log");
        let mut decoder = Decoder::new(system.system_id.clone(), self.routing());
        // An unfinished initial load runs beside the stream, which checks
        // its chunks against the changes between their watermarks.
        let mut load = prepared.load.map(|state| {
            let run = Uuid::new_v4();
            let (chunks, handed) = tokio::sync::mpsc::channel(1);
            let loader = Loader::new(
                self.pool.clone(),
                self.config.clone(),
                run,
                state,
                chunks,
                self.shared.load.clone(),
            );
            info!(slot = %self.config.slot, "loading the captured tables beside the stream");
            LoadRun {
                backfill: Backfill::new(&self.config.slot, run),
                handed,
                task: AbortOnDrop(tokio::spawn(loader.run())),
            }
        });
        // The server's WAL end when the session began: the stream has read
        // what was there once it reports a position at or past it.
        let catch_up_to = system.xlogpos.as_u64();
        let mut rewind = self.shared.rewind.subscribe();
        let mut confirm = self.shared.confirm.subscribe();
        let mut sent = start;
        let mut events_in_transaction = 0usize;
        let mut tick = tokio::time::interval(self.config.status_interval);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    // The client sends a raised position at most once per
                    // status interval, and not at all once stopped: give the
                    // last one its interval, so a clean stop re-reads nothing.
                    let before = sent;
                    self.send_confirmed(&client, &mut sent).await?;
                    if sent > before {
                        tokio::time::sleep(self.config.status_interval + Duration::from_millis(50)).await;
                    }
                    let _ = client.shutdown().await;
                    return Ok(Ended::Stopped);
                }
                _ = rewind.changed() => return Ok(Ended::Rewind),
                _ = tick.tick() => {
                    self.send_confirmed(&client, &mut sent).await?;
                    ticks += 1;
                    if ticks % SLOT_REPORT_TICKS == 1 {
                        self.report_slot().await;
                    }
                }
                _ = confirm.changed() => {}
                ended = async {
                    match load.as_mut() {
                        Some(run) => (&mut run.task.0).await,
                        None => std::future::pending().await,
                    }
                } => {
                    match ended {
                        Ok(Ok(())) => {
                            info!(slot = %self.config.slot, "initial load read");
                            load = None;
                            decoder.watch(None);
                        }
                        Ok(Err(err)) => return Err(SessionError::Failed(err)),
                        Err(panic) => {
                            return Err(SessionError::Failed(PgError::Replication {
                                detail: format!("the initial load's task failed: {panic}"),
                                retryable: true,
                            }))
                        }
                    }
                }
                received = client.recv() => {
                    let Some(event) = received.map_err(classify)? else {
                        return Err(SessionError::Failed(PgError::Replication {
                            detail: "the server ended the replication stream".into(),
                            retryable: true,
                        }));
                    };
                    match event {
                        ReplicationEvent::Begin { final_lsn, commit_time_micros, xid } => {
                            decoder.begin(final_lsn.as_u64(), commit_time_micros, xid);
                            events_in_transaction = 0;
                        }
                        ReplicationEvent::XLogData { data, .. } => {
                            let decoded = decoder.row(&data).map_err(|e| SessionError::Failed(PgError::Replication {
                                detail: format!("cannot decode the replication stream: {e}"),
                                retryable: false,
                            }))?;
                            if let Some(run) = load.as_mut() {
                                run.backfill.touched(decoder.take_touched());
                            }
                            if self.take(decoded, generation).await? {
                                events_in_transaction += 1;
                            }
                        }
                        ReplicationEvent::Message { prefix, content, .. } if prefix == LOAD_PREFIX => {
                            let Some(run) = load.as_mut() else { continue };
                            let Some(mark) = run.backfill.ours(&content) else { continue };
                            if !mark.high {
                                run.backfill.open(&mark);
                                decoder.watch(run.backfill.watched());
                                continue;
                            }
                            decoder.watch(None);
                            // Handed over before the loader wrote this mark.
                            let Some(chunk) = run.handed.recv().await else { continue };
                            if chunk.number != mark.chunk {
                                let _ = chunk.verdict.send(None);
                                continue;
                            }
                            let at = decoder.commit_lsn().unwrap_or_default();
                            let published = self.publish_chunk(&mut run.backfill, &decoder, chunk, at, generation).await?;
                            events_in_transaction += published;
                        }
                        ReplicationEvent::Message { prefix, content, lsn, transactional } => {
                            let decoded = decoder.message(&prefix, &content, lsn.as_u64());
                            if self.take(decoded, generation).await? {
                                events_in_transaction += 1;
                                if !transactional {
                                    self.push(Item::Commit(lsn.as_u64()), generation);
                                }
                            }
                        }
                        ReplicationEvent::Commit { end_lsn, .. } => {
                            if let (Some(run), Some((xid, changed))) = (load.as_mut(), decoder.transaction()) {
                                run.backfill.committed(xid, changed);
                            }
                            decoder.commit();
                            if events_in_transaction > 0 {
                                self.push(Item::Commit(end_lsn.as_u64()), generation);
                            } else {
                                self.confirm_if_idle(end_lsn.as_u64(), generation);
                            }
                        }
                        ReplicationEvent::KeepAlive { wal_end, .. } if !decoder.in_transaction() => {
                            self.confirm_if_idle(wal_end.as_u64(), generation);
                            // Not while a load runs: its chunks are pending too.
                            if wal_end.as_u64() >= catch_up_to
                                && load.is_none()
                                && !self.shared.caught_up.swap(true, std::sync::atomic::Ordering::SeqCst)
                            {
                                self.shared.arrived.notify_waiters();
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// A chunk of the initial load at its high watermark (in the
    /// transaction committing at `at`): queues the rows no change in its
    /// window touched, then its load mark, and tells the loader; or tells
    /// it to read the chunk again. Returns the items queued.
    async fn publish_chunk(
        &self,
        backfill: &mut Backfill,
        decoder: &Decoder,
        chunk: Chunk,
        at: u64,
        generation: u64,
    ) -> Result<usize, SessionError> {
        let keep = match backfill.close(chunk.number, &chunk.keys, &chunk.snapshot) {
            Decision::Publish(keep) => keep,
            Decision::Redo(why) => {
                debug!(slot = %self.config.slot, chunk = chunk.number, why = %why, "initial load: reading a chunk again");
                let _ = chunk.verdict.send(None);
                return Ok(0);
            }
        };
        debug!(slot = %self.config.slot, chunk = chunk.number, read = chunk.rows.len(), publish = keep.len(),
               first = ?chunk.keys.first(), last = ?chunk.keys.last(), "initial load: a chunk at its high watermark");
        let now_ms = system_time_to_ms(std::time::SystemTime::now());
        let mut queued = 0;
        for i in keep {
            let Some(row) = chunk.rows.get(i) else {
                continue;
            };
            let event = decoder.snapshot_row(&chunk.relation, row, at, now_ms);
            if !self.take(Decoded::Event(event), generation).await? {
                // A rewind or a stop: the session ends, the loader with it.
                return Ok(queued);
            }
            queued += 1;
        }
        self.push(
            Item::LoadMark(LoadMark {
                state: chunk.mark,
                complete: chunk.complete,
            }),
            generation,
        );
        let _ = chunk.verdict.send(Some(queued as u64));
        // The mark counts as an item of the transaction: its end is queued
        // after it, so the position moves past the chunk once it is settled.
        Ok(queued + 1)
    }

    /// Confirms `lsn` when no event is queued or in flight: an idle capture
    /// (or one whose tables are quiet) then pins no WAL. Not after a rewind
    /// this session has not seen yet: the emptied queue says nothing about
    /// the events it dropped, which this session's position is past.
    ///
    /// Only a step of at least [`IDLE_CONFIRM_STEP`]: recording a position
    /// writes WAL itself, which the next keepalive reports, so confirming
    /// every idle keepalive would write forever on a server with nothing
    /// to capture.
    fn confirm_if_idle(&self, lsn: u64, generation: u64) {
        if lsn
            < self
                .shared
                .confirm
                .borrow()
                .saturating_add(IDLE_CONFIRM_STEP)
        {
            return;
        }
        let queue = self.shared.lock();
        if queue.generation == generation && queue.outstanding == 0 && queue.items.is_empty() {
            self.shared.advance(lsn);
        }
    }

    /// Records and sends the confirmed position when it moved: the record
    /// first, so it is never behind the slot (how a slot created again is
    /// recognised).
    async fn send_confirmed(
        &self,
        client: &ReplicationClient,
        sent: &mut u64,
    ) -> Result<(), SessionError> {
        let target = *self.shared.confirm.borrow();
        if target <= *sent {
            return Ok(());
        }
        let db = self.connection().await?;
        let table = SqlName::parse(&self.config.progress_table).map_err(SessionError::Failed)?;
        db.execute(
            // Never backwards: a relay that was stopped, woke after another
            // took the slot over and confirmed further, must not make the
            // slot look ahead of the record (a re-created slot).
            &format!(
                "UPDATE {table} SET confirmed_lsn = greatest(confirmed_lsn, $2::text::pg_lsn), \
                 updated_at = now() WHERE slot = $1"
            ),
            &[&self.config.slot, &lsn_text(target)],
        )
        .await
        .map_err(|e| SessionError::Failed(PgError::query("record the WAL position", e)))?;
        client.update_applied_lsn(Lsn::from_u64(target));
        *sent = target;
        Ok(())
    }

    /// Sets the slot's gauges: WAL the server keeps for it, and WAL written
    /// since its confirmed position. A failed reading is skipped: the
    /// stream does not depend on it.
    async fn report_slot(&self) {
        let Ok(db) = self.pool.get().await else {
            return;
        };
        let row = db
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8, \
                        pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.config.slot],
            )
            .await;
        if let Ok(Some(row)) = row {
            let retained: Option<f64> = row.get(0);
            let behind: Option<f64> = row.get(1);
            let slot = self.config.slot.clone();
            metrics::gauge!("outbox_wal_retained_bytes", "slot" => slot.clone())
                .set(retained.unwrap_or(0.0));
            metrics::gauge!("outbox_wal_unconfirmed_bytes", "slot" => slot)
                .set(behind.unwrap_or(0.0));
        }
        let queued = self.shared.lock().items.len();
        metrics::gauge!("outbox_wal_queued_events", "slot" => self.config.slot.clone())
            .set(queued as f64);
    }

    /// Queues what the decoder made; true when it was an event.
    async fn take(&self, decoded: Decoded, generation: u64) -> Result<bool, SessionError> {
        match decoded {
            Decoded::Nothing => Ok(false),
            Decoded::Truncated(tables) => {
                warn!(tables = ?tables, "tables were truncated: a truncate is not captured as events (docs/wal.md)");
                Ok(false)
            }
            Decoded::Poison {
                id,
                content,
                reason,
            } => {
                let event = Event::new("", content).with_id(id);
                warn!(event_id = %id, reason = %reason, "a logical message under the outbox prefix is not an event: dead-lettered");
                let db = self.connection().await?;
                insert_dead_letters(&db, &self.dead_letter, &[(&event, reason.as_str())])
                    .await
                    .map_err(SessionError::Failed)?;
                Ok(false)
            }
            Decoded::Event(event) => {
                // Bounded read-ahead: wait for the relay to take some.
                loop {
                    let space = self.shared.space.notified();
                    tokio::pin!(space);
                    space.as_mut().enable();
                    {
                        let queue = self.shared.lock();
                        if queue.generation != generation {
                            return Ok(false);
                        }
                        if queue.items.len() < self.config.read_ahead {
                            break;
                        }
                    }
                    tokio::select! {
                        _ = space => {}
                        _ = self.stop.cancelled() => return Ok(false),
                    }
                }
                self.push(Item::Event(event), generation);
                Ok(true)
            }
        }
    }

    fn push(&self, item: Item, generation: u64) {
        let mut queue = self.shared.lock();
        if queue.generation != generation {
            return;
        }
        if matches!(item, Item::Event(_)) {
            queue.outstanding += 1;
        }
        queue.items.push_back(item);
        drop(queue);
        self.shared.arrived.notify_waiters();
    }

    fn routing(&self) -> Routing {
        Routing {
            topic_template: self.config.topic_template.clone(),
            tables: self
                .config
                .tables
                .iter()
                .map(|t| (t.qualified(), t.clone()))
                .collect::<HashMap<_, _>>(),
            message_prefix: self.config.message_prefix.clone(),
            outbox_tables: self
                .config
                .outbox_tables
                .iter()
                .map(|t| super::qualified(t))
                .collect(),
        }
    }

    fn replication_config(&self, start: u64) -> ReplicationConfig {
        let mut config = ReplicationConfig::new(
            self.pg.host.clone(),
            self.pg.user.clone(),
            self.pg.password.clone(),
            self.pg.dbname.clone(),
            self.config.slot.clone(),
            self.config.publication.clone(),
        )
        .with_port(self.pg.port)
        .with_tls(crate::tls::replication_tls(
            self.pg.ssl_mode,
            self.pg.ssl_root_cert.clone(),
        ))
        .with_start_lsn(Lsn::from_u64(start))
        .with_status_interval(self.config.status_interval)
        .with_wakeup_interval(self.config.status_interval)
        .with_buffer_size(1024)
        .with_options(SESSION_OPTIONS)
        .with_application_name(format!("{}-wal", self.pg.application_name));
        config.ack_lsn = Some(Lsn::from_u64(start));
        config
    }

    async fn connection(&self) -> Result<deadpool_postgres::Client, SessionError> {
        self.pool.get().await.map_err(|e| {
            SessionError::Failed(PgError::Connect {
                target: self.pg.target(),
                detail: e.to_string(),
                retryable: true,
            })
        })
    }

    /// Checks the server and the slot, creating what is missing when
    /// allowed; returns the position to stream from.
    async fn prepare(&self) -> Result<super::setup::Prepared, SessionError> {
        let db = self.connection().await?;
        super::setup::prepare(&db, &self.config)
            .await
            .map_err(SessionError::Failed)
    }
}

/// A session's initial load: the loader task and what the stream keeps.
struct LoadRun {
    backfill: Backfill,
    handed: tokio::sync::mpsc::Receiver<Chunk>,
    task: AbortOnDrop<std::result::Result<(), PgError>>,
}

/// A task that ends with the session that started it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum SessionError {
    /// The slot is streamed by another session.
    Held(String),
    Failed(PgError),
}

impl From<PgError> for SessionError {
    fn from(err: PgError) -> Self {
        SessionError::Failed(err)
    }
}

/// Classifies an error of the replication connection.
fn classify(err: PgWireError) -> SessionError {
    let text = err.to_string();
    let sqlstate = text
        .split("SQLSTATE ")
        .nth(1)
        .map(|rest| rest.chars().take(5).collect::<String>());
    match sqlstate.as_deref() {
        // object_in_use: another session streams the slot.
        Some("55006") => return SessionError::Held(text),
        Some(code) => {
            // 42710: another relay created the slot first.
            let retryable =
                matches!(&code[..2], "08" | "40" | "53" | "57" | "58") || code == "42710";
            let hint = match code {
                "42704" => "; the slot or publication does not exist: let the relay create it (WalConfig::create) or create it as docs/wal.md shows",
                "42501" | "28000" => "; the user needs the REPLICATION attribute (ALTER ROLE ... REPLICATION) and a pg_hba.conf line that admits it",
                "28P01" => "; check the postgres user and password",
                "55000" => "; the server needs wal_level = logical (a restart)",
                _ => "",
            };
            return SessionError::Failed(PgError::Replication {
                detail: format!("{text}{hint}"),
                retryable,
            });
        }
        None => {}
    }
    let cut_off = matches!(&err, PgWireError::Tls(text) if tls_cut_off(text));
    let hint = match &err {
        PgWireError::Tls(_) if cut_off => "; the server closed the connection (restarting?)",
        PgWireError::Tls(_) => {
            "; check the TLS settings (sslmode and the CA file, as for the pool)"
        }
        PgWireError::Auth(_) => "; check the postgres user and password",
        _ => "",
    };
    SessionError::Failed(PgError::Replication {
        retryable: err.is_transient() || cut_off || matches!(err, PgWireError::Protocol(_)),
        detail: format!("{text}{hint}"),
    })
}

/// Whether a TLS failure is the connection's, not the trust settings': the
/// replication client reports a handshake the server broke off (it was
/// shutting down or starting) the same way as a certificate it refused.
fn tls_cut_off(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("handshake failed")
        && !text.contains("certificate")
        && [
            "eof",
            "reset",
            "broken pipe",
            "timed out",
            "refused",
            "aborted",
        ]
        .iter()
        .any(|cause| text.contains(cause))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retryable(err: PgWireError) -> Option<bool> {
        match classify(err) {
            SessionError::Failed(err) => Some(err.is_retryable()),
            SessionError::Held(_) => None,
        }
    }

    #[test]
    fn a_server_that_goes_away_during_the_tls_handshake_is_retried() {
        // What a relay got while PostgreSQL restarted (chaos run): the
        // server closed the connection in the middle of the handshake.
        let eof = PgWireError::Tls("TLS handshake failed: tls handshake eof".into());
        assert_eq!(retryable(eof), Some(true));
        let reset = PgWireError::Tls(
            "TLS handshake failed: Connection reset by peer (os error 104)".into(),
        );
        assert_eq!(retryable(reset), Some(true));
    }

    #[test]
    fn a_certificate_the_trust_settings_refuse_is_permanent() {
        for text in [
            "TLS handshake failed: invalid peer certificate: UnknownIssuer",
            "server does not support TLS (SSLRequest rejected)",
            "TLS config error: build verifier: no root certificates",
        ] {
            assert_eq!(
                retryable(PgWireError::Tls(text.into())),
                Some(false),
                "{text}"
            );
        }
    }
}
