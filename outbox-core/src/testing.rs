//! In-memory [`Source`], [`Bus`], [`Subscription`] and [`Sink`] with
//! scripted failures (feature `testing`), for fast tests of the loops and of
//! code built on them. Nothing here is durable: tests of the guarantees
//! against PostgreSQL, Kafka and ClickHouse stay with the adapters.
//!
//! Each type is a cheap handle on shared state (`Clone`), so a test keeps
//! one handle to script failures and inspect what happened while the loop
//! owns another.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> outbox_core::Result<()> {
//! use outbox_core::testing::{MemoryBus, MemoryOutbox};
//! use outbox_core::{Event, Relay, RelayConfig};
//!
//! let outbox = MemoryOutbox::new();
//! outbox.push((0..3).map(|n| Event::new("t", format!("{n}")).with_key("k")));
//! let bus = MemoryBus::new(2);
//! bus.fail_publishes(1); // the broker is down once
//! let config = RelayConfig { stop_when_idle: true, ..RelayConfig::default() };
//! Relay::new(outbox.clone(), bus.clone(), config).run(Default::default()).await?;
//! assert_eq!(outbox.completed().len(), 3);
//! assert_eq!(bus.records("t").len(), 3);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::{
    system_time_to_ms, AckSummary, Bus, Checkpoint, Claimed, Delivery, Error, Event, Ownership,
    Position, Record, Result, Sink, Source, Stage, Subscription, WriteReport, HEADER_CREATED_AT_MS,
    HEADER_EVENT_ID,
};

fn lock<T>(state: &Mutex<T>) -> MutexGuard<'_, T> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes one from a scripted failure count; whether one was left.
fn take(count: &mut usize) -> bool {
    let had = *count > 0;
    *count = count.saturating_sub(1);
    had
}

// ------------------------------------------------------------------ source

#[derive(Default)]
struct OutboxState {
    pending: Vec<Event>,
    claimed: HashSet<Uuid>,
    completed: Vec<Uuid>,
    dead_lettered: Vec<(Uuid, String)>,
    claim_failures: usize,
    ack_failures: usize,
    extends: bool,
}

impl OutboxState {
    /// The first `max` pending events no claim holds, now held.
    fn claim_unclaimed(&mut self, max: usize) -> Vec<Event> {
        let events: Vec<Event> = self
            .pending
            .iter()
            .filter(|event| !self.claimed.contains(&event.id))
            .take(max)
            .cloned()
            .collect();
        self.claimed.extend(events.iter().map(|event| event.id));
        events
    }
}

/// An outbox in memory: claims hand out pending events that no other claim
/// holds, oldest first; [`Source::acknowledge`] removes what the broker
/// acknowledged or rejected and releases the rest. A claim dropped without
/// acknowledgement is released (as a rolled-back transaction is). Its
/// concurrent claims are not disjoint by key.
#[derive(Clone, Default)]
pub struct MemoryOutbox {
    state: Arc<Mutex<OutboxState>>,
    /// Wakes [`Source::wait_for_events`] on every push, as `NOTIFY` does.
    pushed: Arc<tokio::sync::Notify>,
}

/// The claim of a [`MemoryOutbox`]: releases its events when dropped.
pub struct MemoryClaim {
    ids: Vec<Uuid>,
    state: Arc<Mutex<OutboxState>>,
}

impl Drop for MemoryClaim {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        for id in &self.ids {
            state.claimed.remove(id);
        }
    }
}

impl MemoryOutbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enqueues events (as committed transactions would).
    pub fn push(&self, events: impl IntoIterator<Item = Event>) {
        lock(&self.state).pending.extend(events);
        self.pushed.notify_waiters();
        self.pushed.notify_one();
    }

    /// An outbox whose open claims take events pushed later
    /// ([`Source::extend_claim`]); it has a single queue, so claims must
    /// not overlap (the relay keeps one in flight, since claims are not
    /// disjoint by key).
    pub fn extending() -> Self {
        let outbox = Self::default();
        lock(&outbox.state).extends = true;
        outbox
    }

    /// The next `n` claims fail (retryably: the database is unreachable).
    pub fn fail_claims(&self, n: usize) {
        lock(&self.state).claim_failures += n;
    }

    /// The next `n` acknowledgements fail (retryably) and change nothing,
    /// as a commit that did not happen.
    pub fn fail_acknowledgements(&self, n: usize) {
        lock(&self.state).ack_failures += n;
    }

    /// Events still pending, in order.
    pub fn pending(&self) -> Vec<Event> {
        lock(&self.state).pending.clone()
    }

    /// Ids removed because the broker acknowledged them, in the order of
    /// their acknowledgements.
    pub fn completed(&self) -> Vec<Uuid> {
        lock(&self.state).completed.clone()
    }

    /// Ids dead-lettered, with the broker's reason.
    pub fn dead_lettered(&self) -> Vec<(Uuid, String)> {
        lock(&self.state).dead_lettered.clone()
    }

    /// Events held by claims right now.
    pub fn claimed(&self) -> usize {
        lock(&self.state).claimed.len()
    }
}

#[async_trait]
impl Source for MemoryOutbox {
    type Claim = MemoryClaim;

    async fn claim(&self, max_events: usize) -> Result<Option<Claimed<MemoryClaim>>> {
        let mut state = lock(&self.state);
        if take(&mut state.claim_failures) {
            return Err(Error::retryable(Stage::Source, "scripted: claim failed"));
        }
        let events = state.claim_unclaimed(max_events);
        if events.is_empty() {
            return Ok(None);
        }
        let ids: Vec<Uuid> = events.iter().map(|event| event.id).collect();
        let claim = MemoryClaim {
            ids,
            state: self.state.clone(),
        };
        Ok(Some(Claimed { events, claim }))
    }

    async fn extend_claim(
        &self,
        claimed: &mut Claimed<MemoryClaim>,
        max_events: usize,
    ) -> Result<usize> {
        let mut state = lock(&self.state);
        if !state.extends {
            return Ok(0);
        }
        if take(&mut state.claim_failures) {
            return Err(Error::retryable(Stage::Source, "scripted: claim failed"));
        }
        let events = state.claim_unclaimed(max_events);
        claimed
            .claim
            .ids
            .extend(events.iter().map(|event| event.id));
        let added = events.len();
        claimed.events.extend(events);
        Ok(added)
    }

    fn extends_claims(&self) -> bool {
        lock(&self.state).extends
    }

    async fn wait_for_events(&self, timeout: Duration) -> Result<()> {
        let _ = tokio::time::timeout(timeout, self.pushed.notified()).await;
        Ok(())
    }

    async fn acknowledge(
        &self,
        claimed: Claimed<MemoryClaim>,
        deliveries: &[Delivery],
    ) -> Result<AckSummary> {
        let mut state = lock(&self.state);
        if take(&mut state.ack_failures) {
            return Err(Error::retryable(Stage::Source, "scripted: commit failed"));
        }
        let mut summary = AckSummary::default();
        let mut done = HashSet::new();
        for (event, delivery) in claimed.events.iter().zip(deliveries) {
            match delivery {
                Delivery::Acknowledged(_) => {
                    state.completed.push(event.id);
                    summary.completed += 1;
                    done.insert(event.id);
                }
                Delivery::Rejected(reason) => {
                    state.dead_lettered.push((event.id, reason.clone()));
                    summary.dead_lettered += 1;
                    done.insert(event.id);
                }
                Delivery::Retryable(_) => summary.released += 1,
            }
        }
        state.pending.retain(|event| !done.contains(&event.id));
        drop(state);
        drop(claimed); // releases what stayed pending
        Ok(summary)
    }
}

// --------------------------------------------------------------------- bus

#[derive(Default)]
struct BusState {
    partitions: i32,
    log: BTreeMap<(String, i32), Vec<Record>>,
    publish_failures: usize,
    lost_acknowledgements: usize,
    refusals: BTreeMap<Uuid, (usize, bool)>,
}

/// A broker in memory: each topic has `partitions` partitions, an event goes
/// to the partition of its key (keyless: of its id), and every append is
/// kept, copies included, at increasing offsets.
#[derive(Clone, Default)]
pub struct MemoryBus {
    state: Arc<Mutex<BusState>>,
}

/// A stable partition for `bytes` (FNV-1a), like a broker's key hash.
fn partition_of(bytes: &[u8], partitions: i32) -> i32 {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    i32::try_from(hash % u64::from(partitions.max(1).unsigned_abs())).unwrap_or(0)
}

impl MemoryBus {
    /// A broker whose topics have `partitions` partitions (at least 1).
    pub fn new(partitions: i32) -> Self {
        let bus = Self::default();
        lock(&bus.state).partitions = partitions.max(1);
        bus
    }

    /// The next `n` publishes fail as a whole (retryably: the producer
    /// cannot reach the broker), appending nothing.
    pub fn fail_publishes(&self, n: usize) {
        lock(&self.state).publish_failures += n;
    }

    /// The next `n` publishes append their events but answer
    /// [`Delivery::Retryable`] for each: acknowledgements lost on the way
    /// back, so a retry appends copies.
    pub fn lose_acknowledgements(&self, n: usize) {
        lock(&self.state).lost_acknowledgements += n;
    }

    /// The next `times` publishes of event `id` are refused:
    /// [`Delivery::Rejected`] if `permanent`, else [`Delivery::Retryable`],
    /// and then, as a broker that keeps each partition's order does, the
    /// later events of its partition in that publish fail too (retryably).
    pub fn refuse(&self, id: Uuid, times: usize, permanent: bool) {
        lock(&self.state).refusals.insert(id, (times, permanent));
    }

    /// Every record of `topic`, by partition then offset.
    pub fn records(&self, topic: &str) -> Vec<Record> {
        let state = lock(&self.state);
        state
            .log
            .iter()
            .filter(|((t, _), _)| t == topic)
            .flat_map(|(_, records)| records.iter().cloned())
            .collect()
    }

    /// A subscription to every partition of `topic`, from the start.
    pub fn subscribe(&self, topic: &str) -> MemorySubscription {
        MemorySubscription {
            bus: self.clone(),
            topic: topic.to_string(),
            next: BTreeMap::new(),
            committed: Arc::default(),
            commit_failures: Arc::default(),
            ownership: None,
            generation: 0,
        }
    }
}

fn record_of(event: &Event, position: Position) -> Record {
    let mut headers = event.headers.clone();
    headers.insert(HEADER_EVENT_ID.to_string(), event.id.to_string());
    let created_ms = system_time_to_ms(event.created_at);
    headers.insert(HEADER_CREATED_AT_MS.to_string(), created_ms.to_string());
    Record {
        topic: event.topic.clone(),
        position,
        key: event.key.clone(),
        payload: Some(event.payload.clone()),
        headers,
        timestamp_ms: Some(created_ms),
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, events: &[Event]) -> Result<Vec<Delivery>> {
        let mut state = lock(&self.state);
        if take(&mut state.publish_failures) {
            return Err(Error::retryable(Stage::Bus, "scripted: broker unreachable"));
        }
        let lose = take(&mut state.lost_acknowledgements);
        let mut deliveries = Vec::with_capacity(events.len());
        let mut stopped: HashSet<i32> = HashSet::new();
        for event in events {
            let key = event.key.as_deref().unwrap_or(event.id.as_bytes());
            let partition = partition_of(key, state.partitions);
            if stopped.contains(&partition) {
                deliveries.push(Delivery::Retryable(
                    "scripted: an earlier event of the partition failed".into(),
                ));
                continue;
            }
            if let Some((times, permanent)) = state.refusals.get_mut(&event.id) {
                if take(times) {
                    deliveries.push(if *permanent {
                        Delivery::Rejected("scripted: refused for good".into())
                    } else {
                        stopped.insert(partition);
                        Delivery::Retryable("scripted: refused this time".into())
                    });
                    continue;
                }
            }
            let log = state
                .log
                .entry((event.topic.clone(), partition))
                .or_default();
            let position = Position {
                partition,
                offset: i64::try_from(log.len()).unwrap_or(i64::MAX),
            };
            log.push(record_of(event, position));
            deliveries.push(if lose {
                Delivery::Retryable("scripted: acknowledgement lost".into())
            } else {
                Delivery::Acknowledged(position)
            });
        }
        Ok(deliveries)
    }
}

// ------------------------------------------------------------ subscription

/// Reads every partition of one topic of a [`MemoryBus`] (or, following an
/// [`Ownership`], the granted ones); positions move only by
/// [`Subscription::commit`], and [`Subscription::rewind`] goes back to them.
pub struct MemorySubscription {
    bus: MemoryBus,
    topic: String,
    next: BTreeMap<i32, i64>,
    committed: Arc<Mutex<Checkpoint>>,
    commit_failures: Arc<Mutex<usize>>,
    /// The ownership followed and the grant applied (partitions, epoch).
    ownership: Option<(Ownership, Option<Grant>)>,
    generation: u64,
}

/// A grant as applied: its partitions and epoch.
type Grant = (Vec<i32>, u64);

impl MemorySubscription {
    /// A handle on the committed positions (kept current as the loop commits).
    pub fn committed(&self) -> Arc<Mutex<Checkpoint>> {
        self.committed.clone()
    }

    /// The next `n` commits fail (retryably), changing nothing.
    pub fn fail_commits(&self, n: usize) {
        *lock(&self.commit_failures) += n;
    }

    /// Applies a new grant between batches, as a broker subscription does:
    /// every partition starts again from its committed position.
    fn apply_ownership(&mut self) {
        let Some((ownership, current)) = self.ownership.as_mut() else {
            return;
        };
        let lease = ownership.lease.borrow_and_update().clone();
        let wanted = (lease.partitions, lease.epoch);
        if current.as_ref() == Some(&wanted) {
            return;
        }
        ownership.applied.send_replace(wanted.0.clone());
        *current = Some(wanted);
        self.generation += 1;
        self.restart_from_committed();
    }

    fn restart_from_committed(&mut self) {
        let committed = lock(&self.committed);
        self.next = committed
            .iter()
            .filter(|(topic, _, _)| *topic == self.topic)
            .map(|(_, partition, offset)| (partition, offset))
            .collect();
    }

    /// Whether `partition` may be read now.
    fn reads(&self, partition: i32) -> bool {
        match &self.ownership {
            None => true,
            Some((_, current)) => current
                .as_ref()
                .is_some_and(|(partitions, _)| partitions.contains(&partition)),
        }
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn poll_batch(&mut self, max_records: usize, max_wait: Duration) -> Result<Vec<Record>> {
        self.apply_ownership();
        let batch: Vec<Record> = {
            let state = lock(&self.bus.state);
            let mut batch = Vec::new();
            for ((topic, partition), log) in &state.log {
                if topic != &self.topic || !self.reads(*partition) {
                    continue;
                }
                let from = self.next.get(partition).copied().unwrap_or(0);
                let from = usize::try_from(from).unwrap_or(usize::MAX);
                let room = max_records.saturating_sub(batch.len());
                batch.extend(log.iter().skip(from).take(room).cloned());
            }
            batch
        };
        if batch.is_empty() {
            tokio::time::sleep(max_wait.max(Duration::from_millis(1))).await;
        }
        for record in &batch {
            self.next
                .insert(record.position.partition, record.position.offset + 1);
        }
        Ok(batch)
    }

    /// Unless it follows an ownership (whose grants it applies when polled).
    fn polls_may_overlap_writes(&self) -> bool {
        self.ownership.is_none()
    }

    async fn commit(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        if take(&mut lock(&self.commit_failures)) {
            return Err(Error::retryable(Stage::Bus, "scripted: commit failed"));
        }
        lock(&self.committed).replace_with(checkpoint);
        Ok(())
    }

    async fn rewind(&mut self) -> Result<()> {
        self.restart_from_committed();
        Ok(())
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn follow_ownership(&mut self, ownership: Ownership) -> Result<()> {
        self.ownership = Some((ownership, None));
        Ok(())
    }
}

// -------------------------------------------------------------------- sink

#[derive(Default)]
struct SinkState {
    rows: Vec<Record>,
    positions: HashSet<(String, Position)>,
    ids: HashSet<String>,
    write_failures: usize,
    poison: HashSet<String>,
    dead: Vec<(Record, String)>,
}

/// A table in memory that writes each event once: a record at a stored
/// position, or with a stored event id (a copy), counts as a duplicate; a
/// poisoned event id is dead-lettered; scripted failures fail whole writes
/// (retryably) before anything is stored.
#[derive(Clone, Default)]
pub struct MemorySink {
    state: Arc<Mutex<SinkState>>,
}

impl MemorySink {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next `n` writes fail, storing nothing.
    pub fn fail_writes(&self, n: usize) {
        lock(&self.state).write_failures += n;
    }

    /// Records with event id `id` can never be written: they are
    /// dead-lettered.
    pub fn poison(&self, id: Uuid) {
        lock(&self.state).poison.insert(id.to_string());
    }

    /// The rows written, in the order written.
    pub fn rows(&self) -> Vec<Record> {
        lock(&self.state).rows.clone()
    }

    /// The records dead-lettered, with their reasons.
    pub fn dead_letters(&self) -> Vec<(Record, String)> {
        lock(&self.state).dead.clone()
    }
}

#[async_trait]
impl Sink for MemorySink {
    async fn write(&mut self, records: &[Record]) -> Result<WriteReport> {
        let mut state = lock(&self.state);
        if take(&mut state.write_failures) {
            return Err(Error::retryable(Stage::Sink, "scripted: table unreachable"));
        }
        let mut report = WriteReport::default();
        for record in records {
            let id = record.headers.get(HEADER_EVENT_ID).cloned();
            let at = (record.topic.clone(), record.position);
            if state.positions.contains(&at) || id.as_ref().is_some_and(|id| state.ids.contains(id))
            {
                report.duplicates += 1;
                continue;
            }
            if id.as_ref().is_some_and(|id| state.poison.contains(id)) {
                let reason = "scripted: poison".to_string();
                state.positions.insert(at);
                state.dead.push((record.clone(), reason.clone()));
                report.dead_lettered.push((record.position, reason));
                continue;
            }
            state.positions.insert(at);
            state.ids.extend(id);
            state.rows.push(record.clone());
            report.written += 1;
        }
        Ok(report)
    }
}
