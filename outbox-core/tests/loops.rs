//! The contracts of the `Relay` and `Consume` loops, in memory (no service
//! runs; the clock is paused, so retries and backoff cost no wall time).
//! Every failure is scripted through `outbox_core::testing`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::testing::{MemoryBus, MemoryOutbox, MemorySink, MemorySubscription};
use outbox_core::{
    Bus, Checkpoint, Consume, ConsumeConfig, Delivery, Event, Record, Relay, RelayConfig, Result,
    Sink, Subscription, WriteReport, HEADER_EVENT_ID,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// `per_key` events for each of `keys` keys, payload "key:n", interleaved.
fn events(keys: usize, per_key: usize) -> Vec<Event> {
    (0..per_key)
        .flat_map(|n| {
            (0..keys).map(move |k| Event::new("t", format!("k{k}:{n}")).with_key(format!("k{k}")))
        })
        .collect()
}

fn fast_relay() -> RelayConfig {
    RelayConfig {
        batch_size: 7,
        stop_when_idle: true,
        backoff_initial: Duration::from_millis(1),
        backoff_max: Duration::from_millis(20),
        ..RelayConfig::default()
    }
}

fn fast_consume() -> ConsumeConfig {
    ConsumeConfig {
        batch_size: 9,
        max_wait: Duration::from_millis(5),
        stop_after_idle: Some(Duration::from_millis(200)),
        backoff_initial: Duration::from_millis(1),
        backoff_max: Duration::from_millis(20),
        ..ConsumeConfig::default()
    }
}

/// A bus that remembers every answer the inner bus gave, per event.
struct Recording {
    inner: MemoryBus,
    answers: Mutex<HashMap<Uuid, Vec<Delivery>>>,
    /// How long each publish takes.
    delay: Duration,
}

impl Recording {
    fn new(inner: MemoryBus) -> Self {
        Self {
            inner,
            answers: Mutex::default(),
            delay: Duration::ZERO,
        }
    }

    fn acknowledged(&self, id: Uuid) -> bool {
        self.answers
            .lock()
            .map(|answers| {
                answers
                    .get(&id)
                    .is_some_and(|a| a.iter().any(Delivery::is_acknowledged))
            })
            .unwrap_or(false)
    }
}

#[async_trait]
impl Bus for Recording {
    async fn publish(&self, events: &[Event]) -> Result<Vec<Delivery>> {
        tokio::time::sleep(self.delay).await;
        let deliveries = self.inner.publish(events).await?;
        if let Ok(mut answers) = self.answers.lock() {
            for (event, delivery) in events.iter().zip(&deliveries) {
                answers.entry(event.id).or_default().push(delivery.clone());
            }
        }
        Ok(deliveries)
    }
}

/// For each key, the payloads in the order of their first appearance in
/// `records` (copies after the first are ignored).
fn first_seen_order(records: &[Record]) -> BTreeMap<String, Vec<String>> {
    let mut seen = HashSet::new();
    let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for record in records {
        let id = record.headers.get(HEADER_EVENT_ID).cloned();
        if !seen.insert(id) {
            continue;
        }
        let key = String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).to_string();
        let payload =
            String::from_utf8_lossy(record.payload.as_deref().unwrap_or_default()).to_string();
        order.entry(key).or_default().push(payload);
    }
    order
}

fn sequences_increase(order: &BTreeMap<String, Vec<String>>) -> bool {
    order.values().all(|payloads| {
        let numbers: Vec<u32> = payloads
            .iter()
            .filter_map(|p| p.split_once(':').and_then(|(_, n)| n.parse().ok()))
            .collect();
        numbers.len() == payloads.len() && numbers.windows(2).all(|w| w[0] < w[1])
    })
}

/// Invariant (nothing is removed that the broker did not acknowledge; no
/// event lost; a key's order kept): under whole-publish failures, lost
/// acknowledgements, refusals of one event and a failed commit, every
/// event the outbox removed had an acknowledgement from the bus, every
/// event is removed in the end, and each key's events first reach the bus
/// in their order.
#[tokio::test(start_paused = true)]
async fn the_relay_removes_only_what_the_bus_acknowledged() -> Result<()> {
    let outbox = MemoryOutbox::new();
    let all = events(5, 12);
    outbox.push(all.clone());
    outbox.fail_claims(2);
    outbox.fail_acknowledgements(1);
    let bus = MemoryBus::new(3);
    bus.fail_publishes(2);
    bus.lose_acknowledgements(2);
    bus.refuse(all[6].id, 4, false);
    let recording = Recording::new(bus.clone());
    let relay = Relay::new(outbox.clone(), recording, fast_relay());
    let stats = relay.run(CancellationToken::new()).await?;
    let (_, recording) = relay.into_parts();

    let completed = outbox.completed();
    let unacknowledged = completed
        .iter()
        .filter(|id| !recording.acknowledged(**id))
        .count();
    let log = bus.records("t");
    let order = first_seen_order(&log);
    println!(
        "events={} completed={} removed_without_ack={unacknowledged} pending={} claimed={} \
         records_on_bus={} (copies from lost acks) retries={} stats={stats:?}",
        all.len(),
        completed.len(),
        outbox.pending().len(),
        outbox.claimed(),
        log.len(),
        stats.retries,
    );
    assert_eq!(unacknowledged, 0, "removed only what the bus acknowledged");
    let distinct: HashSet<Uuid> = completed.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "every event removed, once");
    assert!(outbox.pending().is_empty() && outbox.claimed() == 0);
    assert!(
        log.len() > all.len(),
        "the lost acknowledgements made copies"
    );
    assert!(
        sequences_increase(&order),
        "key order on the bus: {order:?}"
    );
    Ok(())
}

/// A bus that counts its publishes (each part of a growing publish is one
/// here: the default `publish_growing` publishes part by part).
struct Counting {
    inner: Recording,
    publishes: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Bus for Counting {
    async fn publish(&self, events: &[Event]) -> Result<Vec<Delivery>> {
        self.publishes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.publish(events).await
    }
}

/// Invariant (a claim that grows while in flight removes only what the
/// broker acknowledged and keeps each key's order): events pushed while a
/// claim is open join it and are published at once, after its earlier
/// events; a retryable refusal in one part holds the key's later events
/// back (in that part and the parts after it) until a later claim
/// publishes them in order; a failed extension abandons the claim whole.
#[tokio::test(start_paused = true)]
async fn a_claim_that_grows_in_flight_keeps_order_and_removes_only_acknowledged() -> Result<()> {
    let outbox = MemoryOutbox::extending();
    let all = events(4, 15);
    outbox.push(all[..8].iter().cloned());
    let bus = MemoryBus::new(2);
    // An event of the third part, and a claim failure on the way (the
    // first claim succeeds; the next extension or claim fails).
    bus.refuse(all[20].id, 2, false);
    let counting = Counting {
        inner: Recording::new(bus.clone()),
        publishes: Default::default(),
    };
    let config = RelayConfig {
        batch_size: 100,
        claim_window: Duration::from_millis(100),
        extend_interval: Duration::from_millis(5),
        ..fast_relay()
    };
    let pusher = {
        let outbox = outbox.clone();
        let rest = all[8..].to_vec();
        tokio::spawn(async move {
            for (n, chunk) in rest.chunks(4).enumerate() {
                tokio::time::sleep(Duration::from_millis(7)).await;
                if n == 6 {
                    outbox.fail_claims(1);
                }
                outbox.push(chunk.iter().cloned());
            }
        })
    };
    let relay = Relay::new(outbox.clone(), counting, config);
    let stats = relay.run(CancellationToken::new()).await?;
    pusher
        .await
        .map_err(|e| outbox_core::Error::permanent(outbox_core::Stage::Source, e.to_string()))?;
    let (_, counting) = relay.into_parts();
    let publishes = counting
        .publishes
        .load(std::sync::atomic::Ordering::Relaxed);
    let completed = outbox.completed();
    let unacknowledged = completed
        .iter()
        .filter(|id| !counting.inner.acknowledged(**id))
        .count();
    let log = bus.records("t");
    let order = first_seen_order(&log);
    println!(
        "events={} completed={} removed_without_ack={unacknowledged} pending={} claims={} \
         publishes={publishes} records_on_bus={} stats={stats:?}",
        all.len(),
        completed.len(),
        outbox.pending().len(),
        stats.batches,
        log.len(),
    );
    assert_eq!(unacknowledged, 0, "removed only what the bus acknowledged");
    let distinct: HashSet<Uuid> = completed.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "every event removed, once");
    assert!(outbox.pending().is_empty() && outbox.claimed() == 0);
    assert!(
        publishes as u64 > stats.batches + 2,
        "claims grew: {publishes} publishes for {} claims",
        stats.batches
    );
    assert!(
        sequences_increase(&order),
        "key order on the bus: {order:?}"
    );
    Ok(())
}

/// Invariant (a poison event is isolated; the rest flows): an event the
/// broker rejects for good is dead-lettered with the reason, and every
/// other event, its key's included, is published and removed.
#[tokio::test(start_paused = true)]
async fn a_rejected_event_is_dead_lettered_and_the_rest_flows() -> Result<()> {
    let outbox = MemoryOutbox::new();
    let all = events(3, 5);
    outbox.push(all.clone());
    let bus = MemoryBus::new(2);
    let poison = all[4].id;
    bus.refuse(poison, 1, true);
    let stats = Relay::new(outbox.clone(), bus.clone(), fast_relay())
        .run(CancellationToken::new())
        .await?;
    let dead = outbox.dead_lettered();
    println!(
        "dead_lettered={dead:?} completed={} stats={stats:?}",
        outbox.completed().len()
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, poison);
    assert!(
        dead[0].1.contains("refused"),
        "the reason is kept: {}",
        dead[0].1
    );
    assert_eq!(outbox.completed().len(), all.len() - 1);
    assert_eq!(bus.records("t").len(), all.len() - 1);
    Ok(())
}

/// Invariant (a shutdown loses nothing and leaves nothing claimed): a
/// shutdown while a batch is at the broker lets that batch finish; the
/// relay stops with no claim held, and what it did not publish is pending.
#[tokio::test(start_paused = true)]
async fn a_shutdown_mid_batch_finishes_it_and_holds_no_claim() -> Result<()> {
    let outbox = MemoryOutbox::new();
    let all = events(2, 20);
    outbox.push(all.clone());
    let bus = MemoryBus::new(2);
    let mut slow = Recording::new(bus.clone());
    slow.delay = Duration::from_secs(1);
    let relay = Relay::new(
        outbox.clone(),
        slow,
        RelayConfig {
            stop_when_idle: false,
            max_in_flight_batches: 1,
            ..fast_relay()
        },
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.cancel();
    });
    let stats = relay.run(shutdown).await?;
    let published = bus.records("t").len();
    println!(
        "published={published} completed={} pending={} claimed={} stats={stats:?}",
        outbox.completed().len(),
        outbox.pending().len(),
        outbox.claimed()
    );
    assert_eq!(
        published, 14,
        "two batches of 7: the one in flight at the shutdown finished"
    );
    assert_eq!(outbox.completed().len(), published);
    assert_eq!(outbox.pending().len(), all.len() - published);
    assert_eq!(outbox.claimed(), 0);
    Ok(())
}

/// A subscription that checks, at every commit, that the sink holds every
/// record before the committed positions.
struct Checked {
    inner: MemorySubscription,
    sink: MemorySink,
    bus: MemoryBus,
    commits: usize,
    early: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl Subscription for Checked {
    async fn poll_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>> {
        self.inner.poll_batch(max, wait).await
    }

    async fn commit(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        let handled: HashSet<String> = self
            .sink
            .rows()
            .iter()
            .chain(self.sink.dead_letters().iter().map(|(r, _)| r))
            .filter_map(|r| r.headers.get(HEADER_EVENT_ID).cloned())
            .collect();
        for record in self.bus.records("t") {
            let before = checkpoint
                .next_offset(&record.topic, record.position.partition)
                .is_some_and(|next| record.position.offset < next);
            let id = record
                .headers
                .get(HEADER_EVENT_ID)
                .cloned()
                .unwrap_or_default();
            if before && !handled.contains(&id) {
                if let Ok(mut early) = self.early.lock() {
                    early.push(format!("{:?}", record.position));
                }
            }
        }
        self.commits += 1;
        self.inner.commit(checkpoint).await
    }

    fn generation(&self) -> u64 {
        self.inner.generation()
    }

    // Polls overlap writes here, as they do on a Kafka subscription of all
    // partitions: a commit must still never get ahead of the sink.
    fn polls_may_overlap_writes(&self) -> bool {
        self.inner.polls_may_overlap_writes()
    }

    async fn rewind(&mut self) -> Result<()> {
        self.inner.rewind().await
    }
}

/// Invariant (positions move only after the sink's `Ok`; each event written
/// once): with writes failing, a commit failing and copies on the bus, no
/// commit ever covers a record the sink does not hold, and the sink ends
/// with every event once, a poison event dead-lettered, in key order.
#[tokio::test(start_paused = true)]
async fn positions_are_committed_only_after_the_sink_wrote() -> Result<()> {
    let bus = MemoryBus::new(3);
    let all = events(4, 10);
    bus.lose_acknowledgements(1);
    bus.publish(&all[..10]).await?; // acknowledgements lost …
    bus.publish(&all[..10]).await?; // … so the relay published copies
    bus.publish(&all[10..]).await?;
    let sink = MemorySink::new();
    sink.fail_writes(3);
    let poison = all[17].id;
    sink.poison(poison);
    let subscription = bus.subscribe("t");
    subscription.fail_commits(1);
    let committed = subscription.committed();
    let early = Arc::new(Mutex::new(Vec::new()));
    let checked = Checked {
        inner: subscription,
        sink: sink.clone(),
        bus: bus.clone(),
        commits: 0,
        early: early.clone(),
    };
    let mut consume = Consume::new(checked, sink.clone(), fast_consume());
    let stats = consume.run(CancellationToken::new()).await?;
    let rows = sink.rows();
    let ids: HashSet<String> = rows
        .iter()
        .filter_map(|r| r.headers.get(HEADER_EVENT_ID).cloned())
        .collect();
    let early = early.lock().map(|e| e.clone()).unwrap_or_default();
    let committed = committed.lock().map(|c| c.clone()).unwrap_or_default();
    let log_ends: BTreeMap<i32, i64> = bus
        .records("t")
        .iter()
        .map(|r| (r.position.partition, r.position.offset + 1))
        .collect();
    println!(
        "records_on_bus={} rows={} distinct={} dead={} committed_early={early:?} \
         committed={committed:?} stats={stats:?}",
        bus.records("t").len(),
        rows.len(),
        ids.len(),
        sink.dead_letters().len()
    );
    assert!(early.is_empty(), "committed before written: {early:?}");
    assert_eq!(
        rows.len(),
        all.len() - 1,
        "each event once, the poison aside"
    );
    assert_eq!(ids.len(), rows.len());
    assert_eq!(sink.dead_letters().len(), 1);
    assert!(sequences_increase(&first_seen_order(&rows)));
    for (partition, end) in log_ends {
        assert_eq!(committed.next_offset("t", partition), Some(end));
    }
    Ok(())
}

/// A sink whose writes take a while.
struct SlowSink {
    inner: MemorySink,
    delay: Duration,
}

#[async_trait]
impl Sink for SlowSink {
    async fn write(&mut self, records: &[Record]) -> Result<WriteReport> {
        tokio::time::sleep(self.delay).await;
        self.inner.write(records).await
    }
}

/// Invariant (the whole pipeline, in memory: no loss, no duplicate, key
/// order): a relay and a consumer running together, with lost
/// acknowledgements, failed publishes and failed writes, end with every
/// event once in the sink, in each key's order.
#[tokio::test(start_paused = true)]
async fn relay_and_consumer_together_deliver_each_event_once_in_order() -> Result<()> {
    let outbox = MemoryOutbox::new();
    let all = events(6, 25);
    outbox.push(all.clone());
    let bus = MemoryBus::new(4);
    bus.lose_acknowledgements(3);
    bus.fail_publishes(2);
    let sink = MemorySink::new();
    sink.fail_writes(2);
    let relay = Relay::new(outbox.clone(), bus.clone(), fast_relay());
    let mut consume = Consume::new(
        bus.subscribe("t"),
        SlowSink {
            inner: sink.clone(),
            delay: Duration::from_millis(3),
        },
        fast_consume(),
    );
    let (relayed, consumed) = tokio::join!(
        relay.run(CancellationToken::new()),
        consume.run(CancellationToken::new())
    );
    let (relayed, consumed) = (relayed?, consumed?);
    let rows = sink.rows();
    let ids: HashSet<String> = rows
        .iter()
        .filter_map(|r| r.headers.get(HEADER_EVENT_ID).cloned())
        .collect();
    println!(
        "events={} on_bus={} rows={} distinct={} relay={relayed:?} consume={consumed:?}",
        all.len(),
        bus.records("t").len(),
        rows.len(),
        ids.len()
    );
    assert_eq!(rows.len(), all.len());
    assert_eq!(ids.len(), all.len());
    assert!(consumed.duplicates > 0, "the copies were met and skipped");
    assert!(sequences_increase(&first_seen_order(&rows)));
    assert!(outbox.pending().is_empty());
    Ok(())
}

/// Invariant (one writer per partition): two consumers that follow grants
/// of disjoint partitions write disjoint records, together every record
/// once, and each commits only the partitions it was granted.
#[tokio::test(start_paused = true)]
async fn consumers_following_ownership_write_only_their_partitions() -> Result<()> {
    let bus = MemoryBus::new(4);
    let all = events(8, 10);
    let relay = Relay::new(MemoryOutbox::new(), bus.clone(), fast_relay());
    relay.source().push(all.clone());
    relay.run(CancellationToken::new()).await?;

    let mut sinks = Vec::new();
    let mut runs = Vec::new();
    let mut granters = Vec::new();
    for granted in [vec![0, 1], vec![2, 3]] {
        let (granter, ownership) = outbox_core::ownership();
        granter.lease.send_modify(|lease| {
            lease.partitions = granted.clone();
            lease.epoch = 1;
        });
        let subscription = bus.subscribe("t");
        let committed = subscription.committed();
        let sink = MemorySink::new();
        let consume =
            Consume::new(subscription, sink.clone(), fast_consume()).with_ownership(ownership)?;
        sinks.push((granted, sink, committed));
        runs.push(consume);
        granters.push(granter);
    }
    let mut results = Vec::new();
    for mut consume in runs {
        results.push(consume.run(CancellationToken::new()).await?);
    }
    let mut seen = HashSet::new();
    for (granted, sink, committed) in &sinks {
        let rows = sink.rows();
        let partitions: HashSet<i32> = rows.iter().map(|r| r.position.partition).collect();
        let committed_partitions: Vec<i32> = committed
            .lock()
            .map(|c| c.iter().map(|(_, p, _)| p).collect())
            .unwrap_or_default();
        println!(
            "granted={granted:?} rows={} partitions={partitions:?} committed={committed_partitions:?}",
            rows.len()
        );
        assert!(
            partitions.iter().all(|p| granted.contains(p)),
            "{partitions:?}"
        );
        assert!(committed_partitions.iter().all(|p| granted.contains(p)));
        for row in rows {
            assert!(
                seen.insert(row.headers.get(HEADER_EVENT_ID).cloned()),
                "written twice"
            );
        }
    }
    for granter in &granters {
        assert!(
            !granter.applied.borrow().is_empty(),
            "the switch was reported"
        );
    }
    assert_eq!(seen.len(), all.len());
    println!("results={results:?}");
    Ok(())
}

/// A sink that notes when each write starts, and how many records it got.
struct TimedSink {
    inner: MemorySink,
    writes: Arc<Mutex<Vec<(tokio::time::Instant, usize)>>>,
}

#[async_trait]
impl Sink for TimedSink {
    async fn write(&mut self, records: &[Record]) -> Result<WriteReport> {
        if let Ok(mut writes) = self.writes.lock() {
            writes.push((tokio::time::Instant::now(), records.len()));
        }
        self.inner.write(records).await
    }
}

/// Invariant (inserts ClickHouse can merge, nothing lost or reordered):
/// with events trickling in one every 10 ms, writes start no closer
/// together than `min_write_interval`, each taking what arrived meanwhile,
/// and every event is written once, in each key's order. With the floor at
/// zero the same trickle gives a write per poll.
#[tokio::test(start_paused = true)]
async fn writes_come_no_closer_together_than_the_floor() -> Result<()> {
    for floor_ms in [200u64, 0] {
        let bus = MemoryBus::new(2);
        let all = events(3, 40);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let sink = TimedSink {
            inner: MemorySink::new(),
            writes: writes.clone(),
        };
        let rows = sink.inner.clone();
        let config = ConsumeConfig {
            batch_size: 1000,
            min_write_interval: Duration::from_millis(floor_ms),
            ..fast_consume()
        };
        let mut consume = Consume::new(bus.subscribe("t"), sink, config);
        let publisher = {
            let (bus, all) = (bus.clone(), all.clone());
            tokio::spawn(async move {
                for event in all {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    bus.publish(std::slice::from_ref(&event)).await?;
                }
                Ok::<_, outbox_core::Error>(())
            })
        };
        consume.run(CancellationToken::new()).await?;
        publisher
            .await
            .map_err(|e| outbox_core::Error::permanent(outbox_core::Stage::Bus, e))??;
        let writes = writes.lock().map(|w| w.clone()).unwrap_or_default();
        let gaps: Vec<u128> = writes
            .windows(2)
            .map(|w| (w[1].0 - w[0].0).as_millis())
            .collect();
        let rows = rows.rows();
        println!(
            "floor={floor_ms} ms: events={} writes={} rows={} smallest gap={:?} ms",
            all.len(),
            writes.len(),
            rows.len(),
            gaps.iter().min()
        );
        assert_eq!(rows.len(), all.len());
        assert!(sequences_increase(&first_seen_order(&rows)));
        if floor_ms > 0 {
            assert!(gaps.iter().all(|g| *g >= u128::from(floor_ms)), "{gaps:?}");
            // 1.2 s of trickle: about one write per floor, not per event.
            assert!(writes.len() <= 8, "{} writes", writes.len());
        } else {
            assert!(writes.len() > 40, "{} writes", writes.len());
        }
    }
    Ok(())
}
