//! The relay: claims events from a [`Source`], publishes them on a [`Bus`],
//! acknowledges what the broker acknowledged.

use std::collections::HashSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{Bus, Delivery};
use crate::key_order::{
    hold_back_after_failures, keys_with_order_gaps, probe_failing_keys, update_failing_keys,
    FailingKeys,
};
use crate::source::{AckSummary, Claimed, Source};
use crate::{Backoff, ErrorChain, Event, Health, Result, Stage};

/// Settings of a [`Relay`].
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Most events claimed and published at once. Only a backlog fills a
    /// batch (at low load a claim takes what is pending), so this trades a
    /// backlog's drain speed for the relay's memory (both measured in
    /// `docs/performance.md`). Default: 4000.
    pub batch_size: usize,
    /// Longest wait for new events when the outbox is empty. Default: 500 ms.
    pub idle_wait: Duration,
    /// Return from [`Relay::run`] as soon as the outbox is empty. Default: false.
    pub stop_when_idle: bool,
    /// First delay after a retryable failure. Default: 100 ms.
    pub backoff_initial: Duration,
    /// Longest delay between retries. Default: 10 s.
    pub backoff_max: Duration,
    /// Batches claimed and published at the same time while the relay is
    /// behind (see [`RelayConfig::caught_up_in_flight_batches`] for while it
    /// is not), each by its own claim → publish → acknowledge loop. With 2,
    /// one batch is claimed and acknowledged in Postgres while the other is
    /// on its way to the broker.
    ///
    /// Applies only to a source whose concurrent claims never hold events
    /// of one key ([`Source::claims_are_disjoint_by_key`], as
    /// `outbox_pg::PgOutboxSource`, whose claims own disjoint lanes); any
    /// other source gets one batch in flight, since two could publish a key
    /// out of order. Default: 2.
    pub max_in_flight_batches: usize,
    /// Batches in flight while the relay is caught up, that is while its
    /// last claim came back with fewer than [`RelayConfig::batch_size`]
    /// events; up to [`RelayConfig::max_in_flight_batches`] once a claim
    /// comes back full (a backlog), until one does not. At a steady rate the
    /// events that arrive while a batch is in flight then go out together
    /// in the next one, instead of in a second, smaller batch beside it:
    /// fewer, larger produce requests, which is what a broker whose cost
    /// follows its requests needs (on tansu, at 5,000 events/s, one batch
    /// at a time cut the to-Kafka p99 by about a quarter;
    /// `docs/performance.md`). Raise it to
    /// [`RelayConfig::max_in_flight_batches`] for a broker far away (each
    /// batch waits a round trip) whose requests are cheap. Default: 1.
    pub caught_up_in_flight_batches: usize,
    /// How long a claim that was not full stays open to take the events
    /// that arrive meanwhile, with a source that can extend its claims
    /// ([`Source::extends_claims`], as `outbox_pg::PgOutboxSource` with
    /// notifications). Arrivals are claimed into the open claim and
    /// published as the next part of its ordered stream
    /// ([`Bus::publish_growing`]) as soon as the part in flight is answered,
    /// instead of after the claim's last answer, its commit and the next
    /// claim; the claim is acknowledged (and committed) once, after the
    /// window. At a steady rate, 200 ms makes a relay's claim transactions
    /// (and their commits) 8 to 12 times fewer, for a few milliseconds more
    /// latency at low rates (the extension cadence); measured in
    /// `docs/performance.md`. Longer: fewer commits, but the claim's lanes
    /// stay locked, and its transaction open, that long, and more events are
    /// published again after a crash. Default: zero (off: one claim, one
    /// publish), since latency is what most users tune for; worth turning
    /// on where PostgreSQL is bound by its commits.
    pub claim_window: Duration,
    /// Shortest time between two extensions of one claim: the producer
    /// lingers about as long before it sends anyway, and each extension is
    /// a query. Default: 5 ms.
    pub extend_interval: Duration,
    /// Make a span of each batch sent, linked to its events' trace contexts
    /// (see [`crate::otel`]), on the global tracer provider. Default: false
    /// (the loop does not look at headers).
    /// Needs the crate's `otel` feature; without it the flag is ignored
    /// (the field exists either way, so that enabling the feature anywhere
    /// in a build breaks no one's struct literal).
    pub otel_spans: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 4000,
            idle_wait: Duration::from_millis(500),
            stop_when_idle: false,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            max_in_flight_batches: 2,
            caught_up_in_flight_batches: 1,
            claim_window: Duration::ZERO,
            extend_interval: Duration::from_millis(5),
            otel_spans: false,
        }
    }
}

impl RelayConfig {
    /// Checks the values no relay can run with (also done by
    /// [`Relay::run`]; call it early to fail before connecting anywhere).
    ///
    /// ```
    /// use outbox_core::RelayConfig;
    /// assert!(RelayConfig::default().validate().is_ok());
    /// assert!(RelayConfig { batch_size: 0, ..RelayConfig::default() }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        crate::error::at_least_one("batch_size", self.batch_size)?;
        crate::error::at_least_one("max_in_flight_batches", self.max_in_flight_batches)?;
        crate::error::at_least_one(
            "caught_up_in_flight_batches",
            self.caught_up_in_flight_batches,
        )?;
        crate::backoff::check_backoff(self.backoff_initial, self.backoff_max)
    }
}

/// Totals over the life of a [`Relay::run`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Batches claimed.
    pub batches: u64,
    /// Events the broker acknowledged and the source completed.
    pub published: u64,
    /// Events moved to the dead-letter place.
    pub dead_lettered: u64,
    /// Events left pending after a failed publish (they are retried).
    pub released: u64,
    /// Retryable failures seen.
    pub retries: u64,
}

impl RelayStats {
    fn add(&mut self, other: RelayStats) {
        self.batches += other.batches;
        self.published += other.published;
        self.dead_lettered += other.dead_lettered;
        self.released += other.released;
        self.retries += other.retries;
    }
}

/// Drives a [`Source`] into a [`Bus`].
///
/// Each cycle claims a batch, publishes it, waits for every delivery report
/// and then acknowledges the batch to the source, which removes only the
/// events the broker acknowledged. A relay killed at any point therefore
/// leaves every unacknowledged event pending; what it may leave behind is an
/// event that was published but not yet removed, which the next claim
/// publishes again (sinks recognise it by its id).
///
/// ```no_run
/// # async fn example<S: outbox_core::Source, B: outbox_core::Bus>(source: S, bus: B) -> outbox_core::Result<()> {
/// use outbox_core::{Relay, RelayConfig};
/// use tokio_util::sync::CancellationToken;
///
/// let shutdown = CancellationToken::new();
/// let relay = Relay::new(source, bus, RelayConfig::default());
/// let stats = relay.run(shutdown.clone()).await?;
/// println!("published {}", stats.published);
/// # Ok(()) }
/// ```
pub struct Relay<S, B> {
    source: S,
    bus: B,
    config: RelayConfig,
    health: Health,
    /// Keys whose earliest pending event the broker did not take last time.
    failing: std::sync::Mutex<FailingKeys>,
    /// Whether the last claim came back full: the loops then claim
    /// without waiting for a turn.
    behind: tokio::sync::watch::Sender<bool>,
    /// Turns to claim while caught up
    /// ([`RelayConfig::caught_up_in_flight_batches`]).
    caught_up_turns: tokio::sync::Semaphore,
}

impl<S: Source, B: Bus> Relay<S, B> {
    /// A relay over `source` and `bus`.
    pub fn new(source: S, bus: B, config: RelayConfig) -> Self {
        Self {
            source,
            bus,
            health: Health::default(),
            failing: std::sync::Mutex::new(HashSet::new()),
            behind: tokio::sync::watch::Sender::new(false),
            caught_up_turns: tokio::sync::Semaphore::new(config.caught_up_in_flight_batches.max(1)),
            config,
        }
    }

    /// Reports the outcome of every request to the source and the bus to
    /// `health` (for a `/readyz` endpoint).
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Gives back the parts.
    pub fn into_parts(self) -> (S, B) {
        (self.source, self.bus)
    }

    /// The source, for inspection.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// One claim → publish → acknowledge cycle. `Ok(None)` when nothing was pending.
    ///
    /// Emits the `outbox_relay_*` metrics (see the crate's README).
    pub async fn run_once(&self) -> Result<Option<AckSummary>> {
        let started = std::time::Instant::now();
        let claimed = self.source.claim(self.config.batch_size.max(1)).await;
        let claimed = self.observe(claimed)?;
        self.health.up(Stage::Source);
        let full = claimed
            .as_ref()
            .is_some_and(|c| c.events.len() >= self.config.batch_size.max(1));
        self.behind.send_if_modified(|behind| {
            let changed = *behind != full;
            *behind = full;
            changed
        });
        let Some(mut claimed) = claimed else {
            return Ok(None);
        };
        let claimed_len = claimed.events.len();
        let claimed_at = std::time::Instant::now();
        #[cfg(feature = "otel")]
        let send_started = std::time::SystemTime::now();
        // Of a key whose earliest event failed last time, only that event is
        // published (a probe); its later events wait unpublished instead of
        // being published, held back and published again every round.
        let mut publish_now = {
            let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
            probe_failing_keys(&claimed.events, &failing)
        };
        let grows = self.source.extends_claims()
            && !self.config.claim_window.is_zero()
            && claimed_len < self.config.batch_size
            && publish_now.iter().all(|now| *now);
        // On error, dropping the claim abandons it: every event stays pending.
        let published = if grows {
            let (parts, more) = tokio::sync::mpsc::channel(64);
            let first = claimed.events.clone();
            let (published, extended) = tokio::join!(
                self.bus.publish_growing(&first, more),
                self.extend(&mut claimed, parts, started),
            );
            let published = self.observe(published)?;
            self.observe(extended)?;
            publish_now = vec![true; claimed.events.len()];
            published
        } else if publish_now.iter().all(|now| *now) {
            self.observe(self.bus.publish(&claimed.events).await)?
        } else {
            let to_publish: Vec<Event> = claimed
                .events
                .iter()
                .zip(&publish_now)
                .filter(|(_, now)| **now)
                .map(|(event, _)| event.clone())
                .collect();
            let mut answers = self
                .observe(self.bus.publish(&to_publish).await)?
                .into_iter();
            publish_now
                .iter()
                .map(|now| match now {
                    true => answers
                        .next()
                        .unwrap_or_else(|| Delivery::Retryable("the bus gave no answer".into())),
                    false => Delivery::Retryable(
                        "held back unpublished: an earlier event of the same key is not published yet".into(),
                    ),
                })
                .collect()
        };
        let batch_len = claimed.events.len();
        let first_event = claimed.events.first().map(|e| e.id);
        let last_event = claimed.events.last().map(|e| e.id);
        self.health.up(Stage::Bus);
        {
            let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
            update_failing_keys(&mut failing, &claimed.events, &publish_now, &published);
        }
        for (topic, key) in keys_with_order_gaps(&claimed.events, &published) {
            metrics::counter!("outbox_relay_key_order_gaps_total").increment(1);
            warn!(
                topic = %topic,
                key = %String::from_utf8_lossy(&key),
                "the broker acknowledged a later event of a key whose earlier event failed: \
                 unless that failure was a lost acknowledgement, the key is out of order on the topic"
            );
        }
        let deliveries = hold_back_after_failures(&claimed.events, published);
        #[cfg(feature = "otel")]
        if self.config.otel_spans {
            crate::otel::record_send(&claimed.events, &deliveries, send_started);
        }
        let published_at = std::time::Instant::now();
        let summary = self.observe(self.source.acknowledge(claimed, &deliveries).await)?;
        let claim_time = claimed_at.duration_since(started);
        let publish_time = published_at.duration_since(claimed_at);
        let ack_time = published_at.elapsed();
        metrics::counter!("outbox_relay_events_claimed_total").increment(batch_len as u64);
        metrics::counter!("outbox_relay_events_published_total")
            .increment(summary.completed as u64);
        metrics::counter!("outbox_relay_events_dead_lettered_total")
            .increment(summary.dead_lettered as u64);
        metrics::counter!("outbox_relay_events_released_total").increment(summary.released as u64);
        metrics::histogram!("outbox_relay_batch_size").record(batch_len as f64);
        metrics::histogram!("outbox_relay_claim_seconds").record(claim_time.as_secs_f64());
        metrics::histogram!("outbox_relay_publish_seconds").record(publish_time.as_secs_f64());
        metrics::histogram!("outbox_relay_ack_seconds").record(ack_time.as_secs_f64());
        if summary.released > 0 {
            count_error("relay", Stage::Bus, true);
            self.health.down(
                Stage::Bus,
                format!("the broker did not acknowledge {} events", summary.released),
            );
        }
        debug!(
            batch_len,
            extended = batch_len - claimed_len,
            first_event = ?first_event,
            last_event = ?last_event,
            claim_ms = claim_time.as_millis() as u64,
            publish_ms = publish_time.as_millis() as u64,
            ack_ms = ack_time.as_millis() as u64,
            completed = summary.completed,
            dead_lettered = summary.dead_lettered,
            released = summary.released,
            "relay batch acknowledged"
        );
        Ok(Some(summary))
    }

    /// Keeps `claimed` open until [`RelayConfig::claim_window`] after
    /// `opened`, or until it holds a full batch: whenever new events may be
    /// pending (but at most every [`RelayConfig::extend_interval`]), claims
    /// them into it and hands them to the growing publish. Dropping `parts`
    /// (returning) closes the publish.
    async fn extend(
        &self,
        claimed: &mut Claimed<S::Claim>,
        parts: tokio::sync::mpsc::Sender<Vec<Event>>,
        opened: std::time::Instant,
    ) -> Result<()> {
        let opened = tokio::time::Instant::from_std(opened);
        let deadline = opened + self.config.claim_window;
        let mut next_extension = opened;
        loop {
            let room = self.config.batch_size.saturating_sub(claimed.events.len());
            let now = tokio::time::Instant::now();
            if room == 0 || now >= deadline {
                return Ok(());
            }
            // A failed wait counts as a wake-up: the claim then looks for
            // new events every `extend_interval` until the window ends.
            let _ = self.source.wait_for_events(deadline - now).await;
            if tokio::time::Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep_until(next_extension.min(deadline)).await;
            next_extension = tokio::time::Instant::now() + self.config.extend_interval;
            let before = claimed.events.len();
            let added = self.source.extend_claim(claimed, room).await?;
            if added == 0 {
                continue;
            }
            let part = claimed.events[before..].to_vec();
            tracing::trace!(
                part_len = part.len(),
                oldest_age_ms = part.first().map(Event::age_ms).unwrap_or(0),
                newest_age_ms = part.last().map(Event::age_ms).unwrap_or(0),
                "claim extended"
            );
            if parts.send(part).await.is_err() {
                // The publish ended early (the bus failed): it answers with
                // an error, and the claim is abandoned.
                return Ok(());
            }
        }
    }

    /// Records the outcome of one request in [`Health`]: the stage of an
    /// error is down, the stage the request went to is up otherwise.
    fn observe<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(err) = &result {
            self.health.down(err.stage(), ErrorChain(err));
        }
        result
    }

    /// Runs until `shutdown` is cancelled (or the outbox is empty, with
    /// [`RelayConfig::stop_when_idle`]), retrying retryable failures forever.
    ///
    /// A batch in flight when `shutdown` fires is finished first, so the
    /// relay stops with nothing claimed. Returns the first permanent error
    /// (the other loops of [`RelayConfig::max_in_flight_batches`] then
    /// finish their batch and stop too).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<RelayStats> {
        self.config.validate()?;
        // A permanent failure of one loop stops the others, not the caller's token.
        let stop = shutdown.child_token();
        let in_flight = self.in_flight_batches();
        if in_flight < self.config.max_in_flight_batches {
            info!(
                configured = self.config.max_in_flight_batches,
                in_flight,
                "the source's claims may share keys: one batch in flight keeps their order"
            );
        }
        let loops = (0..in_flight).map(|_| self.run_loop(&stop));
        let mut stats = RelayStats::default();
        let mut first_error = None;
        for result in futures::future::join_all(loops).await {
            match result {
                Ok(loop_stats) => stats.add(loop_stats),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        info!(
            published = stats.published,
            dead_lettered = stats.dead_lettered,
            batches = stats.batches,
            "relay stopped"
        );
        match first_error {
            Some(err) => Err(err),
            None => Ok(stats),
        }
    }

    /// How many batches this relay keeps in flight: the configured number
    /// where the source's claims are disjoint by key, else one.
    pub fn in_flight_batches(&self) -> usize {
        in_flight_batches(
            self.config.max_in_flight_batches,
            self.source.claims_are_disjoint_by_key(),
        )
    }

    /// Waits for a turn to claim while the relay is caught up, so that no
    /// more than [`RelayConfig::caught_up_in_flight_batches`] batches are in
    /// flight then; `None` (no wait) once a claim came back full, or when
    /// `shutdown` fired. The turn is pacing only: claims stay disjoint by
    /// key through the source whatever the turns say.
    async fn caught_up_turn(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let mut behind = self.behind.subscribe();
        if *behind.borrow_and_update() {
            return None;
        }
        tokio::select! {
            turn = self.caught_up_turns.acquire() => turn.ok(),
            _ = behind.wait_for(|behind| *behind) => None,
            _ = shutdown.cancelled() => None,
        }
    }

    /// One claim → publish → acknowledge loop.
    async fn run_loop(&self, shutdown: &CancellationToken) -> Result<RelayStats> {
        let mut stats = RelayStats::default();
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        while !shutdown.is_cancelled() {
            let turn = self.caught_up_turn(shutdown).await;
            if shutdown.is_cancelled() {
                break;
            }
            let cycle = self.run_once().await;
            drop(turn);
            match cycle {
                Ok(Some(summary)) => {
                    stats.batches += 1;
                    stats.published += summary.completed as u64;
                    stats.dead_lettered += summary.dead_lettered as u64;
                    stats.released += summary.released as u64;
                    if summary.released > 0 {
                        stats.retries += 1;
                        let delay = backoff.next_delay();
                        warn!(
                            released = summary.released,
                            delay_ms = delay.as_millis() as u64,
                            "broker did not acknowledge every event; they stay pending and are retried"
                        );
                        sleep_or_cancel(delay, shutdown).await;
                    } else {
                        backoff.reset();
                    }
                }
                Ok(None) => {
                    backoff.reset();
                    if self.config.stop_when_idle {
                        break;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        waited = self.source.wait_for_events(self.config.idle_wait) => {
                            if let Err(err) = waited {
                                self.health.down(err.stage(), ErrorChain(&err));
                                warn!(error = %ErrorChain(&err), "waiting for new events failed; polling instead");
                                sleep_or_cancel(self.config.idle_wait, shutdown).await;
                            }
                        }
                    }
                }
                Err(err) if err.is_retryable() => {
                    stats.retries += 1;
                    count_error("relay", err.stage(), true);
                    let delay = backoff.next_delay();
                    warn!(error = %ErrorChain(&err), attempt = backoff.attempts(), delay_ms = delay.as_millis() as u64, "relay cycle failed; retrying");
                    sleep_or_cancel(delay, shutdown).await;
                }
                Err(err) => {
                    count_error("relay", err.stage(), false);
                    shutdown.cancel();
                    return Err(err);
                }
            }
        }
        Ok(stats)
    }
}

/// Counts a failure in `outbox_errors_total{loop, stage, class}`.
pub(crate) fn count_error(loop_name: &'static str, stage: Stage, retryable: bool) {
    crate::metrics_catalog::error_counter(loop_name, stage, retryable).increment(1);
}

pub(crate) async fn sleep_or_cancel(delay: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// Checks that a relay's publish attempt always ends before its claim can
/// be handed over: the producer gives a message up after `message_timeout`,
/// while another relay may claim the events once `claim_timeout` passed.
/// With the message timeout shorter, an original either landed or failed by
/// the time a copy can be published, so a copy always lands *after* its
/// original and at most the claim timeout (plus the new relay's publish)
/// later, which is what a sink's dedup horizon has to cover.
///
/// ```
/// use std::time::Duration;
/// let s = Duration::from_secs;
/// assert!(outbox_core::check_claim_outlives_publish(s(20), s(10)).is_ok());
/// assert!(outbox_core::check_claim_outlives_publish(s(5), s(10)).is_err());
/// ```
pub fn check_claim_outlives_publish(
    claim_timeout: Duration,
    message_timeout: Duration,
) -> crate::Result<()> {
    if message_timeout < claim_timeout {
        return Ok(());
    }
    Err(crate::Error::permanent(
        Stage::Config,
        format!(
            "the producer's message timeout ({message_timeout:?}) must be shorter than the claim timeout \
             ({claim_timeout:?}): otherwise a stalled relay's publish can still land after another relay \
             took its events over, and the copies may arrive before the originals"
        ),
    ))
}

/// Batches in flight for `configured` on a source whose claims are (or are
/// not) disjoint by key.
fn in_flight_batches(configured: usize, disjoint: bool) -> usize {
    if disjoint {
        configured.max(1)
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Position;

    /// An in-memory outbox: claims every pending event in order (so two
    /// claims at once hold the same events: not disjoint by key unless
    /// told to say so), counting the claims held at once.
    #[derive(Default)]
    struct Memory {
        pending: std::sync::Mutex<Vec<Event>>,
        says_disjoint: bool,
        open: std::sync::atomic::AtomicUsize,
        most_open: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Source for Memory {
        type Claim = ();

        async fn claim(&self, max: usize) -> Result<Option<crate::Claimed<()>>> {
            use std::sync::atomic::Ordering::SeqCst;
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.is_empty() {
                return Ok(None);
            }
            let events = pending.iter().take(max).cloned().collect();
            let open = self.open.fetch_add(1, SeqCst) + 1;
            self.most_open.fetch_max(open, SeqCst);
            Ok(Some(crate::Claimed { events, claim: () }))
        }

        fn claims_are_disjoint_by_key(&self) -> bool {
            self.says_disjoint
        }

        async fn acknowledge(
            &self,
            claimed: crate::Claimed<()>,
            deliveries: &[Delivery],
        ) -> Result<AckSummary> {
            self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let mut summary = AckSummary::default();
            for (event, delivery) in claimed.events.iter().zip(deliveries) {
                match delivery {
                    Delivery::Retryable(_) => summary.released += 1,
                    done => {
                        pending.retain(|e| e.id != event.id);
                        if matches!(done, Delivery::Acknowledged(_)) {
                            summary.completed += 1;
                        } else {
                            summary.dead_lettered += 1;
                        }
                    }
                }
            }
            Ok(summary)
        }
    }

    /// A broker that refuses one event (retryably) its first `failures`
    /// times and logs every event it is handed.
    struct Refusing {
        poison: uuid::Uuid,
        failures: std::sync::Mutex<usize>,
        handed: std::sync::Mutex<Vec<uuid::Uuid>>,
    }

    #[async_trait::async_trait]
    impl Bus for Refusing {
        async fn publish(&self, events: &[Event]) -> Result<Vec<Delivery>> {
            let mut handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            Ok(events
                .iter()
                .enumerate()
                .map(|(n, event)| {
                    handed.push(event.id);
                    if event.id == self.poison && *failures > 0 {
                        *failures -= 1;
                        Delivery::Retryable("INVALID_TIMESTAMP".into())
                    } else {
                        Delivery::Acknowledged(Position {
                            partition: 0,
                            offset: n as i64,
                        })
                    }
                })
                .collect())
        }
    }

    /// Invariant (no copies from a poison event): while the earliest event
    /// of a key keeps failing, the key's later events are not handed to the
    /// broker again and again; other keys flow; once the poison passes, the
    /// key's events follow in order, each published once.
    #[tokio::test(start_paused = true)]
    async fn a_failing_event_does_not_republish_its_keys_later_events() -> Result<()> {
        let events: Vec<Event> = (0..6)
            .map(|n| Event::new("t", format!("{n}")).with_key(if n % 2 == 0 { "k" } else { "o" }))
            .collect();
        let poison = events[0].id;
        let source = Memory::default();
        source
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(events.iter().cloned());
        let bus = Refusing {
            poison,
            failures: std::sync::Mutex::new(5),
            handed: Default::default(),
        };
        let relay = Relay::new(
            source,
            bus,
            RelayConfig {
                stop_when_idle: true,
                backoff_initial: Duration::from_millis(1),
                backoff_max: Duration::from_millis(1),
                ..RelayConfig::default()
            },
        );
        let stats = relay.run(CancellationToken::new()).await?;
        let handed = relay
            .bus
            .handed
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        let times = |id: uuid::Uuid| handed.iter().filter(|h| **h == id).count();
        let counts: Vec<usize> = events.iter().map(|e| times(e.id)).collect();
        println!("handed to the broker per event (k: 0,2,4; o: 1,3,5): {counts:?}; {stats:?}");
        assert_eq!(stats.published, 6);
        assert_eq!(counts[0], 6, "the poison: 5 refusals and the success");
        assert_eq!(counts[1], 1);
        assert_eq!(counts[3], 1);
        assert_eq!(counts[5], 1);
        // Published once in the first round (held back), once after the poison passed.
        assert!(counts[2] <= 2 && counts[4] <= 2, "{counts:?}");
        Ok(())
    }

    /// A broker that takes a while and acknowledges everything.
    struct Slow;

    #[async_trait::async_trait]
    impl Bus for Slow {
        async fn publish(&self, events: &[Event]) -> Result<Vec<Delivery>> {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok((0..events.len())
                .map(|n| {
                    Delivery::Acknowledged(Position {
                        partition: 0,
                        offset: n as i64,
                    })
                })
                .collect())
        }
    }

    /// (most claims held at once, events published) for a source that does
    /// or does not say its claims are disjoint, configured for 4 in flight.
    async fn run_with_four_in_flight(says_disjoint: bool) -> Result<(usize, u64)> {
        run_in_flight(says_disjoint, 2, 1).await
    }

    /// The same with 20 events of one key pending, 4 batches in flight at
    /// most, `batch_size` and `caught_up` batches in flight while caught up.
    async fn run_in_flight(
        says_disjoint: bool,
        batch_size: usize,
        caught_up: usize,
    ) -> Result<(usize, u64)> {
        let source = Memory {
            says_disjoint,
            ..Memory::default()
        };
        source
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend((0..20).map(|n| Event::new("t", format!("{n}")).with_key("k")));
        let relay = Relay::new(
            source,
            Slow,
            RelayConfig {
                batch_size,
                max_in_flight_batches: 4,
                caught_up_in_flight_batches: caught_up,
                stop_when_idle: true,
                ..RelayConfig::default()
            },
        );
        let stats = relay.run(CancellationToken::new()).await?;
        let most = relay
            .source
            .most_open
            .load(std::sync::atomic::Ordering::SeqCst);
        Ok((most, stats.published))
    }

    /// Invariant (a key's order is never split across batches in flight):
    /// the relay keeps several batches in flight only for a source whose
    /// claims are disjoint by key; any other source gets one, whatever the
    /// configuration says, and publishes each event once.
    #[tokio::test(start_paused = true)]
    async fn only_a_source_with_disjoint_claims_gets_batches_in_flight() -> Result<()> {
        let (most, published) = run_with_four_in_flight(false).await?;
        println!("claims not disjoint: {most} held at once, {published} published");
        assert_eq!((most, published), (1, 20));
        let (most, _) = run_with_four_in_flight(true).await?;
        println!("claims disjoint: {most} held at once");
        assert_eq!(most, 4);
        assert_eq!(in_flight_batches(0, true), 1);
        Ok(())
    }

    /// Invariant (one batch at a time while caught up, by default): claims
    /// that come back short of a batch never overlap, so the events that
    /// arrive meanwhile go out together in the next one; the configured
    /// number overlap only when asked for, or (above) behind a backlog,
    /// where every claim is full.
    #[tokio::test(start_paused = true)]
    async fn caught_up_claims_take_turns() -> Result<()> {
        let (most, published) = run_in_flight(true, 100, 1).await?;
        println!("caught up, 1 turn: {most} claims held at once, {published} published");
        assert_eq!((most, published), (1, 20));
        let (most, _) = run_in_flight(true, 100, 4).await?;
        println!("caught up, 4 turns: {most} claims held at once");
        assert_eq!(most, 4);
        assert!(RelayConfig {
            caught_up_in_flight_batches: 0,
            ..RelayConfig::default()
        }
        .validate()
        .is_err());
        Ok(())
    }
}
