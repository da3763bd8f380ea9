//! The consumer: reads a [`Subscription`], writes a [`Sink`], then moves positions.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{Checkpoint, Record, Subscription};
use crate::relay::{count_error, sleep_or_cancel};
use crate::sink::Sink;
use crate::{Backoff, Health, Result, Stage};

/// Settings of a [`Consume`] loop.
#[derive(Debug, Clone)]
pub struct ConsumeConfig {
    /// Most records written to the sink at once. Default: 10 000.
    pub batch_size: usize,
    /// Longest wait to fill a batch. Default: 200 ms.
    pub max_wait: Duration,
    /// Return from [`Consume::run`] after this long without any record. Default: never.
    pub stop_after_idle: Option<Duration>,
    /// First delay after a retryable failure. Default: 100 ms.
    pub backoff_initial: Duration,
    /// Longest delay between retries. Default: 10 s.
    pub backoff_max: Duration,
}

impl Default for ConsumeConfig {
    fn default() -> Self {
        Self {
            batch_size: 10_000,
            max_wait: Duration::from_millis(200),
            stop_after_idle: None,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
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
}

/// Drives a [`Subscription`] into a [`Sink`].
///
/// Positions are committed only after the sink acknowledged the whole batch,
/// so a consumer killed at any point reads again what it had not committed.
/// A sink that recognises already written records (as `sink-clickhouse` does
/// through the positions stored with each row) turns that into exactly-once.
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
}

impl<B: Subscription, K: Sink> Consume<B, K> {
    /// A consumer loop over `subscription` and `sink`.
    pub fn new(subscription: B, sink: K, config: ConsumeConfig) -> Self {
        Self {
            subscription,
            sink,
            config,
            health: Health::default(),
        }
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
        let mut stats = ConsumeStats::default();
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut idle_since = tokio::time::Instant::now();
        loop {
            let poll_started = tokio::time::Instant::now();
            let polled = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                polled = self.subscription.poll_batch(self.config.batch_size.max(1), self.config.max_wait) => polled,
            };
            let records = match polled {
                Ok(records) => {
                    self.health.up(Stage::Bus);
                    records
                }
                Err(err) if err.is_retryable() => {
                    self.health.down(err.stage(), &err);
                    count_error("consume", err.stage(), true);
                    stats.retries += 1;
                    let delay = backoff.next_delay();
                    warn!(error = %err, delay_ms = delay.as_millis() as u64, "polling the bus failed; retrying");
                    sleep_or_cancel(delay, &shutdown).await;
                    continue;
                }
                Err(err) => {
                    self.health.down(err.stage(), &err);
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
            let poll_ms = idle_since.duration_since(poll_started).as_millis() as u64;
            let Some(report) = self
                .write_with_retry(&records, &mut backoff, &mut stats, &shutdown)
                .await?
            else {
                break;
            };
            stats.batches += 1;
            stats.written += report.written as u64;
            stats.duplicates += report.duplicates as u64;
            stats.dead_lettered += report.dead_lettered.len() as u64;
            let write_time = idle_since.elapsed();
            metrics::counter!("outbox_consumer_records_total").increment(records.len() as u64);
            metrics::counter!("outbox_sink_rows_written_total").increment(report.written as u64);
            metrics::counter!("outbox_sink_duplicates_total").increment(report.duplicates as u64);
            metrics::counter!("outbox_sink_dead_lettered_total")
                .increment(report.dead_lettered.len() as u64);
            metrics::histogram!("outbox_consumer_batch_size").record(records.len() as f64);
            metrics::histogram!("outbox_sink_write_seconds").record(write_time.as_secs_f64());
            let first = &records[0].position;
            let last = &records[records.len() - 1].position;
            debug!(
                batch_len = records.len(),
                first_position = %format_args!("{}:{}", first.partition, first.offset),
                last_position = %format_args!("{}:{}", last.partition, last.offset),
                poll_ms,
                write_ms = write_time.as_millis() as u64,
                written = report.written,
                duplicates = report.duplicates,
                dead_lettered = report.dead_lettered.len(),
                "sink batch acknowledged"
            );
            // The positions are a hint only (the sink keeps the truth), so a
            // failed commit is logged, not retried: the next commit covers it.
            if let Err(err) = self.subscription.commit(&checkpoint_after(&records)).await {
                count_error("consume", err.stage(), err.is_retryable());
                warn!(error = %err, "committing consumer positions failed; records will be re-read and skipped as duplicates");
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

    /// `Ok(None)` when shutdown interrupted the retries (nothing committed).
    async fn write_with_retry(
        &mut self,
        records: &[Record],
        backoff: &mut Backoff,
        stats: &mut ConsumeStats,
        shutdown: &CancellationToken,
    ) -> Result<Option<crate::WriteReport>> {
        loop {
            match self.sink.write(records).await {
                Ok(report) => {
                    self.health.up(Stage::Sink);
                    backoff.reset();
                    return Ok(Some(report));
                }
                Err(err) if err.is_retryable() => {
                    self.health.down(err.stage(), &err);
                    count_error("consume", err.stage(), true);
                    stats.retries += 1;
                    if shutdown.is_cancelled() {
                        return Ok(None);
                    }
                    let delay = backoff.next_delay();
                    warn!(error = %err, attempt = backoff.attempts(), delay_ms = delay.as_millis() as u64, "sink write failed; retrying the same batch");
                    sleep_or_cancel(delay, shutdown).await;
                }
                Err(err) => {
                    self.health.down(err.stage(), &err);
                    count_error("consume", err.stage(), false);
                    return Err(err);
                }
            }
        }
    }
}

/// For each (topic, partition) in `records`, the offset after the highest one.
pub fn checkpoint_after(records: &[Record]) -> Checkpoint {
    let mut checkpoint = Checkpoint::new();
    for record in records {
        let next = record.position.offset + 1;
        let entry = checkpoint
            .entry((record.topic.clone(), record.position.partition))
            .or_insert(next);
        *entry = (*entry).max(next);
    }
    checkpoint
}
