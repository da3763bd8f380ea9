//! The consumer: reads a [`Subscription`], writes a [`Sink`], then moves positions.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{Checkpoint, Record, Subscription};
use crate::relay::{count_error, sleep_or_cancel};
use crate::sink::{Sink, WriteReport};
use crate::{Backoff, Error, ErrorChain, Health, Lease, Result, Stage};

/// Settings of a [`Consume`] loop.
#[derive(Debug, Clone)]
pub struct ConsumeConfig {
    /// Most records written to the sink at once. Default: 10 000.
    pub batch_size: usize,
    /// Longest wait to fill a batch. Default: 200 ms.
    pub max_wait: Duration,
    /// Least time between the starts of two writes: a batch that is not
    /// full keeps collecting records until this long after the last write
    /// began. Each write is a ClickHouse insert, and each insert a part the
    /// server must merge; few, large inserts are what it asks for. Where
    /// batches come further apart than this it costs nothing; where they
    /// would come closer, up to this much latency (`docs/performance.md`).
    /// Zero writes as soon as a batch is polled. Default: 200 ms.
    pub min_write_interval: Duration,
    /// Return from [`Consume::run`] after this long without any record. Default: never.
    pub stop_after_idle: Option<Duration>,
    /// First delay after a retryable failure. Default: 100 ms.
    pub backoff_initial: Duration,
    /// Longest delay between retries. Default: 10 s.
    pub backoff_max: Duration,
    /// With [`Consume::with_lease`]: how long the sink may keep failing
    /// before the loop stops with [`Error::Retryable`] so that the process
    /// gives its partitions up (its leases end with it) and a consumer that
    /// can write takes them. Default: 60 s. Without a lease the loop retries
    /// forever: nobody else could take over.
    pub stall_limit: Duration,
    /// Make a span of each batch written, linked to its records' trace
    /// contexts (see [`crate::otel`]), on the global tracer provider.
    /// Default: false (the loop does not look at headers).
    /// Needs the crate's `otel` feature; without it the flag is ignored
    /// (the field exists either way, so that enabling the feature anywhere
    /// in a build breaks no one's struct literal).
    pub otel_spans: bool,
}

impl Default for ConsumeConfig {
    fn default() -> Self {
        Self {
            batch_size: 10_000,
            max_wait: Duration::from_millis(200),
            min_write_interval: Duration::from_millis(200),
            stop_after_idle: None,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stall_limit: Duration::from_secs(60),
            otel_spans: false,
        }
    }
}

impl ConsumeConfig {
    /// Checks the values no consumer loop can run with (also done by
    /// [`Consume::run`]; call it early to fail before connecting anywhere).
    ///
    /// ```
    /// use outbox_core::ConsumeConfig;
    /// assert!(ConsumeConfig::default().validate().is_ok());
    /// assert!(ConsumeConfig { batch_size: 0, ..ConsumeConfig::default() }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        crate::error::at_least_one("batch_size", self.batch_size)?;
        crate::backoff::check_backoff(self.backoff_initial, self.backoff_max)
    }
}

/// Totals over the life of a [`Consume::run`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConsumeStats {
    /// Batches written.
    pub batches: u64,
    /// Records written.
    pub written: u64,
    /// Redelivered records recognised and skipped.
    pub duplicates: u64,
    /// Records dead-lettered by the sink.
    pub dead_lettered: u64,
    /// Retryable failures seen.
    pub retries: u64,
    /// Batches abandoned uncommitted because the lease expired or moved
    /// while they were written (see [`Consume::with_lease`]).
    pub fenced: u64,
}

/// Drives a [`Subscription`] into a [`Sink`].
///
/// Positions are committed only after the sink acknowledged the whole batch,
/// so a consumer killed at any point reads again what it had not committed.
/// A sink that recognises already written records (as `sink-clickhouse` does
/// through the positions stored with each row) turns that into exactly-once.
/// Batches are written one after the other, in the order they were polled;
/// where the subscription allows it
/// ([`Subscription::polls_may_overlap_writes`]), the batch after a full one
/// is polled while the sink writes it.
///
/// ```no_run
/// # async fn example<B: outbox_core::Subscription, K: outbox_core::Sink>(bus: B, sink: K) -> outbox_core::Result<()> {
/// use outbox_core::{Consume, ConsumeConfig};
/// use tokio_util::sync::CancellationToken;
///
/// let stats = Consume::new(bus, sink, ConsumeConfig::default())
///     .run(CancellationToken::new())
///     .await?;
/// println!("wrote {}", stats.written);
/// # Ok(()) }
/// ```
pub struct Consume<B, K> {
    subscription: B,
    sink: K,
    config: ConsumeConfig,
    health: Health,
    lease: Option<watch::Receiver<Lease>>,
    generation: u64,
}

/// How one batch ended.
enum Outcome {
    Written(crate::WriteReport),
    /// The lease expired or moved: nothing may be assumed, nothing committed.
    Fenced,
    Shutdown,
}

impl<B: Subscription, K: Sink> Consume<B, K> {
    /// A consumer loop over `subscription` and `sink`.
    pub fn new(subscription: B, sink: K, config: ConsumeConfig) -> Self {
        Self {
            subscription,
            sink,
            config,
            health: Health::default(),
            lease: None,
            generation: 0,
        }
    }

    /// Fences every write with the partitions granted on `lease` (the
    /// channel the subscription follows, for example from
    /// `outbox_pg::PartitionLeases`): a batch is written only while the grant
    /// covers its partitions and is valid, and a write still running when
    /// the grant expires or moves to a new epoch is abandoned (dropped
    /// mid-request, left uncommitted, the subscription rewound and the sink's
    /// cached positions forgotten). So a consumer cut off from whatever
    /// grants its lease stops writing before anyone else may start.
    pub fn with_lease(mut self, lease: watch::Receiver<Lease>) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Shares partitions with other consumers: the subscription follows
    /// `ownership` ([`Subscription::follow_ownership`]) and every write is
    /// fenced by its lease ([`Consume::with_lease`]). Fails when the
    /// subscription cannot follow a grant.
    ///
    /// ```
    /// # #[cfg(feature = "testing")]
    /// # fn example() -> outbox_core::Result<()> {
    /// use outbox_core::testing::{MemoryBus, MemorySink};
    /// use outbox_core::{Consume, ConsumeConfig};
    ///
    /// let (granter, ownership) = outbox_core::ownership();
    /// let consume = Consume::new(MemoryBus::new(2).subscribe("t"), MemorySink::new(), ConsumeConfig::default())
    ///     .with_ownership(ownership)?;
    /// # drop((granter, consume)); Ok(()) }
    /// ```
    pub fn with_ownership(mut self, ownership: crate::Ownership) -> Result<Self> {
        let lease = ownership.lease.clone();
        self.subscription.follow_ownership(ownership)?;
        Ok(self.with_lease(lease))
    }

    /// Reports the outcome of every poll and write to `health` (for a
    /// `/readyz` endpoint).
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Gives back the parts.
    pub fn into_parts(self) -> (B, K) {
        (self.subscription, self.sink)
    }

    /// Runs until `shutdown` is cancelled. A batch whose write started is
    /// finished (or abandoned uncommitted) before returning.
    pub async fn run(&mut self, shutdown: CancellationToken) -> Result<ConsumeStats> {
        self.config.validate()?;
        let mut stats = ConsumeStats::default();
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut idle_since = tokio::time::Instant::now();
        // Under a backlog (a full batch in hand), where a poll cannot move
        // partitions, the next batch is polled while the sink writes this
        // one, so the sink never waits for the conversion of fetched
        // messages. Not below a full batch: a poll returns a linger after
        // its first record, so polled during the insert the next batch would
        // hold only that linger's events and leave the rest for a batch
        // after it, where polled after the insert it holds everything that
        // arrived meanwhile (measured: twice the inserts at 1,000 events/s).
        // With a lease the next poll could apply a new grant (and report it
        // applied) while a dropped partition's batch is still being written,
        // so it waits.
        let may_overlap = self.lease.is_none() && self.subscription.polls_may_overlap_writes();
        let mut ahead: Option<Polled> = None;
        let mut last_write: Option<Instant> = None;
        loop {
            let polled = match ahead.take() {
                Some(polled) => polled,
                None => match poll(
                    &mut self.subscription,
                    &self.config,
                    self.lease.as_ref(),
                    &shutdown,
                )
                .await
                {
                    Some(polled) => polled,
                    None => break,
                },
            };
            let mut records = match polled.records {
                Ok(records) => {
                    self.health.up(Stage::Bus);
                    records
                }
                Err(err) if err.is_retryable() => {
                    self.health.down(err.stage(), ErrorChain(&err));
                    count_error("consume", err.stage(), true);
                    stats.retries += 1;
                    let delay = backoff.next_delay();
                    warn!(error = %ErrorChain(&err), delay_ms = delay.as_millis() as u64, "polling the bus failed; retrying");
                    sleep_or_cancel(delay, &shutdown).await;
                    continue;
                }
                Err(err) => {
                    self.health.down(err.stage(), ErrorChain(&err));
                    count_error("consume", err.stage(), false);
                    return Err(err);
                }
            };
            if records.is_empty() {
                if let Some(limit) = self.config.stop_after_idle {
                    if idle_since.elapsed() >= limit {
                        break;
                    }
                }
                continue;
            }
            idle_since = tokio::time::Instant::now();
            if let Some(last) = last_write {
                ahead = top_up(
                    &mut self.subscription,
                    &self.config,
                    self.lease.as_ref(),
                    last,
                    &mut records,
                    polled.generation,
                    &shutdown,
                )
                .await;
            }
            let poll_ms = polled.took.as_millis() as u64;
            if polled.generation != self.generation {
                // Another consumer may have written these partitions since.
                self.sink.forget_positions();
                self.generation = polled.generation;
            }
            // The written batch is counted and logged as soon as the sink
            // returns, not when an overlapping poll ends: its log line's
            // time is when its rows were written.
            let write = async {
                let started = Instant::now();
                #[cfg(feature = "otel")]
                let started_wall = std::time::SystemTime::now();
                last_write = Some(started);
                let outcome = write_with_retry(
                    &mut self.sink,
                    self.lease.as_mut(),
                    &self.config,
                    &self.health,
                    Batch {
                        records: &records,
                        epoch: polled.epoch,
                    },
                    &mut backoff,
                    &mut stats,
                    &shutdown,
                )
                .await;
                if let Ok(Outcome::Written(report)) = &outcome {
                    report_written(&records, report, poll_ms, started.elapsed(), &mut stats);
                    #[cfg(feature = "otel")]
                    if self.config.otel_spans {
                        crate::otel::record_process(&records, started_wall, report.written);
                    }
                }
                outcome
            };
            let outcome = if may_overlap && records.len() >= self.config.batch_size {
                let (outcome, next) = tokio::join!(
                    write,
                    poll(&mut self.subscription, &self.config, None, &shutdown)
                );
                ahead = next;
                outcome
            } else {
                write.await
            };
            match outcome? {
                Outcome::Written(_) => {}
                Outcome::Shutdown => break,
                Outcome::Fenced => {
                    stats.fenced += 1;
                    metrics::counter!("outbox_consumer_fenced_batches_total").increment(1);
                    warn!(
                        records = records.len(),
                        "partition lease expired or moved during a write; batch abandoned uncommitted"
                    );
                    self.sink.forget_positions();
                    // Whatever was read ahead is read again after the rewind.
                    ahead = None;
                    self.subscription.rewind().await?;
                    continue;
                }
            }
            // The positions are a hint only (the sink keeps the truth), so a
            // failed commit is logged, not retried: the next commit covers it.
            if let Err(err) = self.subscription.commit(&checkpoint_after(&records)).await {
                count_error("consume", err.stage(), err.is_retryable());
                warn!(error = %ErrorChain(&err), "committing consumer positions failed; records will be re-read and skipped as duplicates");
            }
        }
        info!(
            written = stats.written,
            duplicates = stats.duplicates,
            dead_lettered = stats.dead_lettered,
            "consumer stopped"
        );
        Ok(stats)
    }
}

/// Counts a written batch in `stats` and the metrics, and logs it.
fn report_written(
    records: &[Record],
    report: &WriteReport,
    poll_ms: u64,
    write_time: Duration,
    stats: &mut ConsumeStats,
) {
    stats.batches += 1;
    stats.written += report.written as u64;
    stats.duplicates += report.duplicates as u64;
    stats.dead_lettered += report.dead_lettered.len() as u64;
    metrics::counter!("outbox_consumer_records_total").increment(records.len() as u64);
    metrics::counter!("outbox_sink_rows_written_total").increment(report.written as u64);
    metrics::counter!("outbox_sink_duplicates_total").increment(report.duplicates as u64);
    metrics::counter!("outbox_sink_dead_lettered_total")
        .increment(report.dead_lettered.len() as u64);
    metrics::histogram!("outbox_consumer_batch_size").record(records.len() as f64);
    metrics::histogram!("outbox_sink_write_seconds").record(write_time.as_secs_f64());
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return;
    };
    debug!(
        batch_len = records.len(),
        first_position = %format_args!("{}:{}", first.position.partition, first.position.offset),
        last_position = %format_args!("{}:{}", last.position.partition, last.position.offset),
        positions = %PositionRanges(records),
        poll_ms,
        write_ms = write_time.as_millis() as u64,
        written = report.written,
        duplicates = report.duplicates,
        dead_lettered = report.dead_lettered.len(),
        "sink batch acknowledged"
    );
}

/// One poll's outcome, with what the loop needs to know of when it was made.
struct Polled {
    records: Result<Vec<Record>>,
    took: Duration,
    /// The grant the records were read under: the subscription applies it
    /// (or a newer one) at the start of the poll, and a write is fenced off
    /// when the epoch moved since, however briefly.
    epoch: Option<u64>,
    /// The subscription's generation once the records were read.
    generation: u64,
}

/// Polls one batch; `None` once `shutdown` fired.
async fn poll<B: Subscription>(
    subscription: &mut B,
    config: &ConsumeConfig,
    lease: Option<&watch::Receiver<Lease>>,
    shutdown: &CancellationToken,
) -> Option<Polled> {
    let started = Instant::now();
    let epoch = lease.map(|lease| lease.borrow().epoch);
    let records = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return None,
        polled = subscription.poll_batch(config.batch_size.max(1), config.max_wait) => polled,
    };
    Some(Polled {
        records,
        took: started.elapsed(),
        epoch,
        generation: subscription.generation(),
    })
}

/// Polls more into `records` (not full) until
/// [`ConsumeConfig::min_write_interval`] has passed since `last_write`, so
/// that writes come no closer together than that. What a poll brings under
/// another generation (partitions moved), or its failure, is given back for
/// the next batch.
async fn top_up<B: Subscription>(
    subscription: &mut B,
    config: &ConsumeConfig,
    lease: Option<&watch::Receiver<Lease>>,
    last_write: Instant,
    records: &mut Vec<Record>,
    generation: u64,
    shutdown: &CancellationToken,
) -> Option<Polled> {
    loop {
        let remaining = config
            .min_write_interval
            .saturating_sub(last_write.elapsed());
        if remaining.is_zero() || records.len() >= config.batch_size {
            return None;
        }
        let started = Instant::now();
        let epoch = lease.map(|lease| lease.borrow().epoch);
        let more = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            more = subscription.poll_batch(config.batch_size - records.len(), remaining) => more,
        };
        let now = subscription.generation();
        match more {
            Ok(more) if now == generation => records.extend(more),
            other => {
                return Some(Polled {
                    records: other,
                    took: started.elapsed(),
                    epoch,
                    generation: now,
                })
            }
        }
    }
}

/// Records to write and the grant they were read under.
struct Batch<'a> {
    records: &'a [Record],
    epoch: Option<u64>,
}

/// Writes one batch, retrying retryable failures (with a lease, until
/// [`ConsumeConfig::stall_limit`]).
#[allow(clippy::too_many_arguments)]
async fn write_with_retry<K: Sink>(
    sink: &mut K,
    mut lease: Option<&mut watch::Receiver<Lease>>,
    config: &ConsumeConfig,
    health: &Health,
    batch: Batch<'_>,
    backoff: &mut Backoff,
    stats: &mut ConsumeStats,
    shutdown: &CancellationToken,
) -> Result<Outcome> {
    let mut failing_since: Option<Instant> = None;
    loop {
        let written = match lease.as_deref_mut() {
            None => sink.write(batch.records).await,
            Some(lease) => match fenced_write(sink, lease, batch.epoch, batch.records).await {
                Some(written) => written,
                None => return Ok(Outcome::Fenced),
            },
        };
        match written {
            Ok(report) => {
                health.up(Stage::Sink);
                backoff.reset();
                return Ok(Outcome::Written(report));
            }
            Err(err) if err.is_retryable() => {
                health.down(err.stage(), ErrorChain(&err));
                count_error("consume", err.stage(), true);
                stats.retries += 1;
                if shutdown.is_cancelled() {
                    return Ok(Outcome::Shutdown);
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if lease.is_some() && since.elapsed() >= config.stall_limit {
                    return Err(Error::retryable(
                        Stage::Sink,
                        format!(
                            "the sink kept failing for {:?} while this consumer held leased partitions \
                             (last error: {}); stopping so that its leases end and a consumer that \
                             can write takes them over",
                            config.stall_limit,
                            ErrorChain(&err)
                        ),
                    ));
                }
                let delay = backoff.next_delay();
                warn!(error = %ErrorChain(&err), attempt = backoff.attempts(), delay_ms = delay.as_millis() as u64, "sink write failed; retrying the same batch");
                sleep_or_cancel(delay, shutdown).await;
            }
            Err(err) => {
                health.down(err.stage(), ErrorChain(&err));
                count_error("consume", err.stage(), false);
                return Err(err);
            }
        }
    }
}

/// Writes `records`, read under the grant of `epoch`, while `lease` allows
/// it: `None` when the grant does not cover them, expired, or is of another
/// epoch (before or during the write, which is then dropped mid-request).
async fn fenced_write<K: Sink>(
    sink: &mut K,
    lease: &mut watch::Receiver<Lease>,
    epoch: Option<u64>,
    records: &[Record],
) -> Option<Result<crate::WriteReport>> {
    let mut partitions: Vec<i32> = records.iter().map(|r| r.position.partition).collect();
    partitions.sort_unstable();
    partitions.dedup();
    let granted = lease.borrow_and_update().clone();
    if Some(granted.epoch) != epoch || !granted.allows(partitions.iter().copied(), Instant::now()) {
        return None;
    }
    let mut deadline = granted.valid_until;
    let write = sink.write(records);
    tokio::pin!(write);
    loop {
        tokio::select! {
            // The deadline first: a write that ended after it is not trusted.
            biased;
            () = sleep_until_some(deadline) => return None,
            changed = lease.changed() => {
                // A granter that went away grants nothing any more.
                changed.ok()?;
                let next = lease.borrow_and_update().clone();
                if granted.revoked_by(&next) {
                    return None;
                }
                deadline = next.valid_until;
            }
            written = &mut write => return Some(written),
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The positions a batch covers, for its log line: `topic:partition:first-last`
/// for each (topic, partition), comma-separated, in (topic, partition)
/// order. Formatted only when the line is logged. With the line's time
/// (taken once the sink wrote the batch), it tells when each record was
/// written, which `make bench` uses instead of polling the table.
struct PositionRanges<'a>(&'a [Record]);

impl std::fmt::Display for PositionRanges<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ranges: std::collections::BTreeMap<(&str, i32), (i64, i64)> =
            std::collections::BTreeMap::new();
        for record in self.0 {
            let offset = record.position.offset;
            let range = ranges
                .entry((record.topic.as_str(), record.position.partition))
                .or_insert((offset, offset));
            range.0 = range.0.min(offset);
            range.1 = range.1.max(offset);
        }
        for (i, ((topic, partition), (first, last))) in ranges.into_iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{topic}:{partition}:{first}-{last}")?;
        }
        Ok(())
    }
}

/// For each (topic, partition) in `records`, the offset after the highest one.
pub fn checkpoint_after(records: &[Record]) -> Checkpoint {
    let mut checkpoint = Checkpoint::new();
    for record in records {
        checkpoint.advance(
            &record.topic,
            record.position.partition,
            record.position.offset + 1,
        );
    }
    checkpoint
}

#[cfg(test)]
mod tests {
    //! The loop's contract with in-memory trait doubles: what it commits,
    //! what it asks the sink to forget, when it abandons a write.
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;

    use super::*;
    use crate::{Position, WriteReport};

    #[derive(Default)]
    struct Log {
        events: Vec<String>,
    }

    type Shared = Arc<Mutex<Log>>;

    fn note(log: &Shared, event: impl Into<String>) {
        if let Ok(mut log) = log.lock() {
            log.events.push(event.into());
        }
    }

    fn events(log: &Shared) -> Vec<String> {
        log.lock().map(|l| l.events.clone()).unwrap_or_default()
    }

    /// Hands out scripted batches; each batch may come with a new generation.
    struct Script {
        batches: VecDeque<(u64, Vec<Record>)>,
        generation: u64,
        log: Shared,
        overlap: bool,
    }

    #[async_trait]
    impl Subscription for Script {
        async fn poll_batch(&mut self, _max: usize, _wait: Duration) -> Result<Vec<Record>> {
            match self.batches.pop_front() {
                Some((generation, records)) => {
                    note(&self.log, format!("poll {}", records.len()));
                    self.generation = generation;
                    Ok(records)
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok(Vec::new())
                }
            }
        }

        async fn commit(&mut self, checkpoint: &Checkpoint) -> Result<()> {
            note(&self.log, format!("commit {checkpoint:?}"));
            Ok(())
        }

        fn generation(&self) -> u64 {
            self.generation
        }

        fn polls_may_overlap_writes(&self) -> bool {
            self.overlap
        }

        async fn rewind(&mut self) -> Result<()> {
            note(&self.log, "rewind");
            Ok(())
        }
    }

    /// A sink whose writes take `write_time` (or fail, while `failing`).
    struct Slow {
        write_time: Duration,
        failing: bool,
        log: Shared,
        /// When set, a failed write moves the grant to a new epoch (the
        /// lease was lost and taken again while the sink was failing).
        bump: Option<watch::Sender<Lease>>,
    }

    #[async_trait]
    impl Sink for Slow {
        async fn write(&mut self, records: &[Record]) -> Result<WriteReport> {
            note(&self.log, format!("write start {}", records.len()));
            tokio::time::sleep(self.write_time).await;
            if self.failing {
                if let Some(bump) = &self.bump {
                    bump.send_modify(|lease| lease.epoch += 1);
                }
                return Err(Error::retryable(Stage::Sink, "clickhouse is not answering"));
            }
            note(&self.log, "write end");
            Ok(WriteReport {
                written: records.len(),
                ..WriteReport::default()
            })
        }

        fn forget_positions(&mut self) {
            note(&self.log, "forget");
        }
    }

    fn records(partition: i32, offsets: std::ops::Range<i64>) -> Vec<Record> {
        offsets
            .map(|offset| Record {
                topic: "t".into(),
                position: Position { partition, offset },
                key: None,
                payload: None,
                headers: Default::default(),
                timestamp_ms: None,
            })
            .collect()
    }

    fn consume(
        batches: Vec<(u64, Vec<Record>)>,
        write_time: Duration,
        failing: bool,
    ) -> (Consume<Script, Slow>, Shared) {
        let log = Shared::default();
        let subscription = Script {
            batches: batches.into(),
            generation: 0,
            log: log.clone(),
            overlap: false,
        };
        let sink = Slow {
            write_time,
            failing,
            log: log.clone(),
            bump: None,
        };
        let config = ConsumeConfig {
            stop_after_idle: Some(Duration::from_millis(50)),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(10),
            stall_limit: Duration::from_millis(300),
            // These scripts test when polls happen; the floor between
            // writes would add polls of its own (tests/loops.rs tests it).
            min_write_interval: Duration::ZERO,
            ..ConsumeConfig::default()
        };
        (Consume::new(subscription, sink, config), log)
    }

    fn lease(partitions: &[i32], epoch: u64, valid_for: Duration) -> Lease {
        Lease {
            partitions: partitions.to_vec(),
            epoch,
            valid_until: Some(Instant::now() + valid_for),
        }
    }

    #[test]
    fn a_batch_logs_the_range_of_each_partition() {
        let mut batch = records(1, 5..8);
        batch.extend(records(0, 3..5));
        batch.push(records(1, 9..10).remove(0));
        assert_eq!(PositionRanges(&batch).to_string(), "t:0:3-4,t:1:5-9");
        assert_eq!(PositionRanges(&[]).to_string(), "");
    }

    /// A partition that came back (new generation) may have been written by
    /// another owner meanwhile: the sink forgets before the next write, also
    /// when that batch was polled while the previous one was written.
    #[tokio::test(start_paused = true)]
    async fn a_new_generation_makes_the_sink_forget_before_writing() -> Result<()> {
        for overlap in [false, true] {
            let (mut consume, log) = consume(
                vec![
                    (1, records(0, 0..3)),
                    (1, records(0, 3..5)),
                    (2, records(0, 3..5)),
                ],
                Duration::from_millis(10),
                false,
            );
            consume.subscription.overlap = overlap;
            consume.config.batch_size = 2;
            let stats = consume.run(CancellationToken::new()).await?;
            let seen = events(&log);
            let forgets: Vec<usize> = seen
                .iter()
                .enumerate()
                .filter(|(_, e)| *e == "forget")
                .map(|(i, _)| i)
                .collect();
            println!("overlap {overlap}: {seen:?}");
            assert_eq!(stats.written, 7);
            // Once for generation 1 (first batch), once for generation 2.
            assert_eq!(forgets.len(), 2, "{seen:?}");
            assert_eq!(seen[forgets[1] + 1], "write start 2");
            // After the batch before it was written and committed.
            let second_commit = seen
                .iter()
                .position(|e| e == "commit Checkpoint({(\"t\", 0): 5})");
            assert!(second_commit < Some(forgets[1]), "{seen:?}");
        }
        Ok(())
    }

    /// Where polls move no partition, the batch after a full one is polled
    /// while the sink writes (and the batches are still written and
    /// committed one after the other, in order); after a batch that was
    /// not full, the poll waits for the write, to take what arrived during
    /// it; with a lease the poll always waits for the write, since it could
    /// apply a new grant meanwhile.
    #[tokio::test(start_paused = true)]
    async fn the_next_poll_overlaps_a_write_only_without_a_lease() -> Result<()> {
        let batches = || {
            vec![
                (1, records(0, 0..3)),
                (1, records(0, 3..5)),
                (1, records(0, 5..6)),
            ]
        };
        let (mut unleased, log) = consume(batches(), Duration::from_millis(100), false);
        unleased.subscription.overlap = true;
        unleased.config.batch_size = 3;
        let stats = unleased.run(CancellationToken::new()).await?;
        let seen = events(&log);
        println!("unleased: {seen:?}");
        assert_eq!(stats.written, 6);
        assert_eq!(
            seen[..11],
            [
                "poll 3",
                "forget",
                "write start 3",
                "poll 2",
                "write end",
                "commit Checkpoint({(\"t\", 0): 3})",
                "write start 2",
                "write end",
                "commit Checkpoint({(\"t\", 0): 5})",
                "poll 1",
                "write start 1",
            ]
        );

        let (_tx, rx) = watch::channel(lease(&[0], 1, Duration::from_secs(60)));
        let (mut leased, log) = consume(batches(), Duration::from_millis(100), false);
        leased.subscription.overlap = true;
        leased.config.batch_size = 3;
        let stats = leased.with_lease(rx).run(CancellationToken::new()).await?;
        let seen = events(&log);
        println!("leased: {seen:?}");
        assert_eq!(stats.written, 6);
        assert_eq!(
            seen[..5],
            [
                "poll 3",
                "forget",
                "write start 3",
                "write end",
                "commit Checkpoint({(\"t\", 0): 3})"
            ]
        );
        Ok(())
    }

    /// Invariant (no second writer): a write still running when its grant
    /// expires is abandoned: not committed, the subscription rewound, the
    /// sink told to forget.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_outlives_its_grant_is_abandoned_uncommitted() -> Result<()> {
        let (tx, rx) = watch::channel(lease(&[0], 1, Duration::from_millis(100)));
        let (consumer, log) = consume(
            vec![(1, records(0, 0..3))],
            Duration::from_millis(500),
            false,
        );
        let mut consume = consumer.with_lease(rx);
        let stats = consume.run(CancellationToken::new()).await?;
        let seen = events(&log);
        println!("{seen:?} fenced={}", stats.fenced);
        assert_eq!(stats.fenced, 1);
        assert_eq!(stats.written, 0);
        assert!(!seen
            .iter()
            .any(|e| e.starts_with("commit") || e == "write end"));
        assert!(
            seen.ends_with(&["forget".into(), "rewind".into()]),
            "{seen:?}"
        );
        drop(tx);
        Ok(())
    }

    /// A grant renewed while the write runs lets it finish; a new epoch
    /// (the session was lost) abandons it at once.
    #[tokio::test(start_paused = true)]
    async fn renewals_extend_a_write_and_a_new_epoch_stops_it() -> Result<()> {
        let (tx, rx) = watch::channel(lease(&[0], 1, Duration::from_millis(100)));
        let (consumer, log) = consume(
            vec![(1, records(0, 0..3)), (1, records(0, 3..6))],
            Duration::from_millis(250),
            false,
        );
        let mut consume = consumer.with_lease(rx);
        let renewals = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                tx.send_replace(lease(&[0], 1, Duration::from_millis(100)));
            }
            // The first write has ended; the second one is running.
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send_replace(lease(&[], 2, Duration::ZERO));
            tx
        });
        let stats = consume.run(CancellationToken::new()).await?;
        let seen = events(&log);
        println!("{seen:?}");
        assert_eq!((stats.written, stats.fenced), (3, 1), "{seen:?}");
        drop(renewals.await);
        Ok(())
    }

    /// A batch read under one epoch is not written under the next, even to
    /// the same partitions: the sink's cached positions may be stale, since
    /// another owner may have written in between. Here the first attempt
    /// fails, the epoch moves during the backoff, and the retry is fenced.
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_the_epoch_moved_is_abandoned() -> Result<()> {
        let (tx, rx) = watch::channel(lease(&[0], 1, Duration::from_secs(60)));
        let (mut consumer, log) = consume(vec![(1, records(0, 0..3))], Duration::ZERO, true);
        consumer.sink.bump = Some(tx);
        let stats = consumer
            .with_lease(rx)
            .run(CancellationToken::new())
            .await?;
        let seen = events(&log);
        println!("{seen:?} {stats:?}");
        assert_eq!(stats.fenced, 1, "{stats:?}");
        assert_eq!(
            seen.iter().filter(|e| e.starts_with("write start")).count(),
            1
        );
        Ok(())
    }

    /// A batch of a partition the grant does not cover is never written.
    #[tokio::test(start_paused = true)]
    async fn a_batch_outside_the_grant_is_not_written() -> Result<()> {
        let (_tx, rx) = watch::channel(lease(&[1], 1, Duration::from_secs(60)));
        let (consumer, log) = consume(vec![(1, records(0, 0..3))], Duration::ZERO, false);
        let stats = consumer
            .with_lease(rx)
            .run(CancellationToken::new())
            .await?;
        assert_eq!((stats.written, stats.fenced), (0, 1));
        assert!(!events(&log).iter().any(|e| e.starts_with("write")));
        Ok(())
    }

    /// A leased consumer whose sink keeps failing stops within the stall
    /// limit (its leases then end with it); without a lease it keeps trying.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_sink_gives_a_lease_up() -> Result<()> {
        let (_tx, rx) = watch::channel(Lease {
            partitions: vec![0],
            epoch: 1,
            valid_until: None,
        });
        let (leased, _) = consume(vec![(1, records(0, 0..3))], Duration::ZERO, true);
        let started = Instant::now();
        let outcome = leased.with_lease(rx).run(CancellationToken::new()).await;
        let err = outcome
            .err()
            .ok_or_else(|| Error::permanent(Stage::Sink, "no stall"))?;
        let message = ErrorChain(&err).to_string();
        println!("stopped after {:?}: {message}", started.elapsed());
        assert!(message.contains("kept failing"));
        assert!(started.elapsed() < Duration::from_secs(1));

        let (mut unleased, _) = consume(vec![(1, records(0, 0..3))], Duration::ZERO, true);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.cancel();
        });
        let stats = unleased.run(shutdown).await?;
        assert!(stats.retries > 50, "{stats:?}");
        Ok(())
    }
}
