//! Ours under a steady rate: the shipped relay and consumer binaries fed
//! `rate` events a second, each event timed from its commit to Kafka and to
//! its ClickHouse row, with probes of the broker and of ClickHouse under
//! the same load beside them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outbox_core::Event;
use outbox_kafka::rdkafka::consumer::BaseConsumer;
use outbox_kafka::rdkafka::ClientConfig;
use outbox_pg::{migrate, Outbox};
use serde::Deserialize;
use uuid::Uuid;

use crate::budget::{budget_of, Budget};
use crate::cpu::{cpu_between, cpu_snapshot};
use crate::hops::{drop_ch_tables, drop_pg_tables, outbox_config};
use crate::pipeline::{
    consumer_args, drop_slot, relay_args, relay_args_for, wal_config, wal_relay_args, STOP_GRACE,
};
use crate::{key, payload, say, Env};
use test_support::{Launch, Process};

/// What a latency phase's relay reads, and so how its events are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// The outbox table (`Outbox::enqueue`), claimed in batches.
    Outbox,
    /// The write-ahead log (`Outbox::emit`), through a replication slot.
    Wal,
    /// A business table with a "sent" flag (the original demo's source):
    /// rows inserted, the relay publishes each and sets its flag.
    FlagTable,
}

impl Capture {
    fn suffix(self) -> &'static str {
        match self {
            Capture::Outbox => "",
            Capture::Wal => "wal",
            Capture::FlagTable => "flag",
        }
    }
}

/// The flag table a [`Capture::FlagTable`] phase on `table` writes (the
/// shape of the demo's `user_logins`).
fn flag_table(table: &str) -> String {
    format!("{table}_rows")
}

/// Writes the events `from..to` in one transaction, the way `capture`
/// reads them, and commits; gives the ids the relay will publish them under.
async fn write_events(
    client: &mut outbox_pg::deadpool_postgres::Client,
    outbox: &Outbox,
    capture: Capture,
    topic: &str,
    table: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<Uuid>> {
    let tx = client.transaction().await?;
    let ids = match capture {
        Capture::FlagTable => {
            let flag = flag_table(table);
            let keys: Vec<String> = range.map(key).collect();
            let rows = tx
                .query(
                    &format!(
                        "INSERT INTO {flag} (username, event_type) \
                         SELECT u, 'login' FROM unnest($1::text[]) AS u RETURNING id"
                    ),
                    &[&keys],
                )
                .await?;
            rows.iter()
                .map(|row| outbox_pg::flag_row_event_id(&flag, row.get::<_, i64>(0)))
                .collect()
        }
        Capture::Outbox | Capture::Wal => {
            let events: Vec<Event> = range
                .map(|i| Event::new(topic.to_string(), payload(i)).with_key(key(i)))
                .collect();
            if capture == Capture::Wal {
                outbox.emit(&tx, &events).await?;
            } else {
                outbox.enqueue(&tx, &events).await?;
            }
            events.iter().map(|event| event.id).collect()
        }
    };
    tx.commit().await?;
    Ok(ids)
}

/// The relay reading `table`'s flag table (see [`flag_table`]) into `topic`.
fn flag_relay_args(env: &Env, table: &str, topic: &str) -> Vec<String> {
    relay_args_for(
        env,
        table,
        &[
            "--source",
            "flag-table",
            "--table",
            &flag_table(table),
            "--topic",
            topic,
        ],
    )
}

/// One steady-rate latency run.
pub struct LatencyRun {
    /// Commit of the enqueue transaction → row visible in ClickHouse, ms, sorted.
    pub latencies_ms: Vec<f64>,
    /// Commit → message readable from the broker (the relay's share), ms, sorted.
    pub to_kafka_ms: Vec<f64>,
    /// Share of the machine's CPU time that was busy while events were
    /// written, in percent (NaN without `/proc/stat`).
    pub cpu_busy_pct: f64,
    /// Seconds of CPU per 1,000 events of each process while events were
    /// written (the processes of `cpu::cpu_snapshot`).
    pub cpu_s_per_1k: Vec<(&'static str, f64)>,
    /// Where the average event waited in the relay (from its batch logs;
    /// the warm-up event included).
    pub relay_budget: Budget,
    /// And in the consumer.
    pub consumer_budget: Budget,
    /// The broker hop under this very load: send → readable, ms, sorted, of
    /// a raw producer (the relay's settings) sending [`PROBE_RATE`] messages
    /// a second into the same topic while the run writes, read by the same
    /// tap. What an event would wait if the relay took no time at all, on a
    /// machine as busy as this run made it.
    pub hop_under_load_ms: Vec<f64>,
    /// ClickHouse under this very load, in the runs without a floor between
    /// inserts (empty in the others): an insert of [`INSERT_PROBE_ROWS`]
    /// rows into a table of its own every [`INSERT_PROBE_EVERY`], timed
    /// from its start until ClickHouse accepted it, ms, sorted. What the
    /// consumer's insert would take if our code took no time at all.
    pub insert_under_load_ms: Vec<f64>,
}

/// The machine's CPU time so far (busy, total), in clock ticks, from the
/// first line of `/proc/stat`; iowait counts as idle.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user and nice).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

fn busy_pct(start: Option<(u64, u64)>, end: Option<(u64, u64)>) -> f64 {
    match (start, end) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            // iowait may step back on Linux, so busy time may too.
            busy1.saturating_sub(busy0) as f64 * 100.0 / (total1 - total0) as f64
        }
        _ => f64::NAN,
    }
}

impl LatencyRun {
    /// The `q` quantile (1.0 = max) of commit → ClickHouse.
    pub fn percentile(&self, q: f64) -> f64 {
        quantile(&self.latencies_ms, q)
    }

    /// The `q` quantile of commit → readable from the broker.
    pub fn to_kafka_percentile(&self, q: f64) -> f64 {
        quantile(&self.to_kafka_ms, q)
    }
}

/// A steady rate in 10 ms ticks, for a given length.
pub struct Pace {
    started: Instant,
    rate: f64,
    length: Duration,
    tick: tokio::time::Interval,
}

impl Pace {
    pub fn new(rate: u32, length: Duration) -> Self {
        Self {
            started: Instant::now(),
            rate: f64::from(rate),
            length,
            tick: tokio::time::interval(Duration::from_millis(10)),
        }
    }

    /// At the next tick, how many events should have been sent since the
    /// start; `None` once the length is over.
    pub async fn next(&mut self) -> Option<usize> {
        if self.started.elapsed() >= self.length {
            return None;
        }
        self.tick.tick().await;
        Some((self.started.elapsed().as_secs_f64() * self.rate) as usize)
    }
}

/// For each id in both maps, the time from its `start` to its `end` in ms,
/// sorted.
pub fn delays_ms(start: &HashMap<Uuid, Instant>, end: &HashMap<Uuid, Instant>) -> Vec<f64> {
    let mut ms: Vec<f64> = start
        .iter()
        .filter_map(|(id, at)| {
            end.get(id)
                .map(|seen| seen.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// What the tap read: when each event id first became readable, and where.
pub struct Tapped {
    pub seen: HashMap<Uuid, Instant>,
    pub positions: HashMap<Uuid, (i32, i64)>,
}

/// Reads `topic` from its end on its own thread and notes when each event
/// id becomes readable: splits the end-to-end latency into the relay's share
/// and the consumer's.
pub fn tap_topic(
    brokers: &str,
    topic: &str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<Tapped>> {
    use outbox_kafka::rdkafka::consumer::Consumer;
    use outbox_kafka::rdkafka::message::Headers;
    use outbox_kafka::rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}_tap"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("log_level", "3")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let mut list = TopicPartitionList::new();
    for partition in metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
    {
        list.add_partition_offset(topic, partition, Offset::End)?;
    }
    consumer.assign(&list)?;
    Ok(std::thread::spawn(move || {
        let mut seen = HashMap::new();
        let mut positions = HashMap::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let at = Instant::now();
            let id = message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == outbox_core::HEADER_EVENT_ID)
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| Uuid::parse_str(v).ok())
            });
            if let Some(id) = id {
                seen.entry(id).or_insert(at);
                positions
                    .entry(id)
                    .or_insert((message.partition(), message.offset()));
            }
        }
        Tapped { seen, positions }
    }))
}

/// When each committed event's row was first written, from the consumer's
/// log (by the position the tap read it at), checked against the table's
/// polls: every event the polls saw must have a logged write no later
/// than the poll (within [`PROBE_TOLERANCE`]).
fn written_from_log(
    log: &std::path::Path,
    topic: &str,
    tapped: &Tapped,
    committed: &HashMap<Uuid, Instant>,
    seen_at: &HashMap<Uuid, Instant>,
    clock: (Instant, std::time::SystemTime),
) -> anyhow::Result<HashMap<Uuid, Instant>> {
    let text = std::fs::read_to_string(log)
        .with_context(|| format!("reading the consumer's log {}", log.display()))?;
    let first = crate::arrivals::FirstWritten::from_log(&text, topic)?;
    let mut written = HashMap::with_capacity(committed.len());
    let (mut unlogged, mut early) = (0usize, 0usize);
    let polled_rows = committed
        .keys()
        .filter_map(|id| seen_at.get(id).map(|polled| (id, polled)));
    for (id, polled) in polled_rows {
        let logged = tapped
            .positions
            .get(id)
            .and_then(|(partition, offset)| first.at(*partition, *offset))
            .and_then(|at| at.duration_since(clock.1).ok())
            .map(|since| clock.0 + since);
        match logged {
            Some(at) => {
                if at > *polled + PROBE_TOLERANCE {
                    early += 1;
                }
                written.insert(*id, at);
            }
            None => unlogged += 1,
        }
    }
    if unlogged > 0 || early > 0 {
        bail!(
            "the consumer's log does not account for the rows ClickHouse holds: {unlogged} rows \
             without a logged write at their position, {early} rows seen in the table more than \
             {PROBE_TOLERANCE:?} before their logged write (see {})",
            log.display()
        );
    }
    Ok(written)
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct Seen {
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid,
    kafka_partition: i32,
    kafka_offset: i64,
}

/// How often the latency phases look at ClickHouse: to know when every
/// row arrived, and to check the arrival times the consumer's log gives
/// (see [`crate::arrivals`]); not to time the rows.
const TABLE_CHECK_EVERY: Duration = Duration::from_millis(100);

/// A log time later than the poll that already saw its row by more than
/// this means the log-based probe is wrong (the consumer logs a batch right
/// after its insert returns; a poll may see the rows a little earlier).
const PROBE_TOLERANCE: Duration = Duration::from_millis(50);

/// Messages per second of the hop probe that runs beside each latency
/// phase: few enough to add little to the broker's load (a produce request
/// each), enough for a p99 over a 10 s phase.
pub const PROBE_RATE: u32 = 20;

/// How often the insert probe of a run without a floor between inserts
/// inserts: a tenth of the parts the consumer makes at 1,000 events/s
/// without the floor, and 100 samples in a 10 s phase.
pub const INSERT_PROBE_EVERY: Duration = Duration::from_millis(100);

/// Rows of each probe insert: as many as the lone inserts of the floor
/// (`raw_insert_small_*`).
pub const INSERT_PROBE_ROWS: usize = 20;

/// Runs a relay and a consumer, enqueues `rate` events per second for
/// `length`, and measures for each event the time from its enqueue
/// transaction's commit to its row being written to ClickHouse: the time
/// the consumer logged the batch that first wrote the record (after its
/// insert returned), matched by the record's position as the topic tap read
/// it. The table is polled every [`TABLE_CHECK_EVERY`] to check those
/// times and to know when every row is in.
///
/// `capture` says what the relay reads (see [`Capture`]) and so how the
/// events are written.
pub async fn latency(
    env: &Env,
    rate: u32,
    length: Duration,
    capture: Capture,
    insert_floor_ms: Option<u64>,
) -> anyhow::Result<LatencyRun> {
    let wal = capture == Capture::Wal;
    let table = env.name(&format!(
        "lat{rate}{}{}",
        capture.suffix(),
        insert_floor_ms.map_or(String::new(), |ms| format!("floor{ms}"))
    ));
    let topic = table.clone();
    let config = outbox_config(&table)?;
    // Also the dead-letter table every source writes to.
    migrate(&env.pool.get().await?, &config).await?;
    if wal {
        outbox_pg::wal::create_slot(&env.pool.get().await?, &wal_config(&table)).await?;
    }
    if capture == Capture::FlagTable {
        let flag = flag_table(&table);
        env.pool
            .get()
            .await?
            .batch_execute(&format!(
                "CREATE TABLE {flag} (id bigserial PRIMARY KEY, username text NOT NULL, \
                 event_type text NOT NULL, event_time timestamptz NOT NULL DEFAULT now(), \
                 sent_to_kafka boolean NOT NULL DEFAULT false); \
                 CREATE INDEX ON {flag} (id) WHERE NOT sent_to_kafka"
            ))
            .await?;
        // As the demo's table: the relay wakes at each insert's commit.
        outbox_pg::install_flag_notify(
            &env.pool.get().await?,
            &outbox_pg::FlagTableConfig {
                table: flag,
                topic: topic.clone(),
                dead_letter_table: format!("{table}_dead"),
                ..outbox_pg::FlagTableConfig::default()
            }
            .validate()?,
        )
        .await?;
    }
    outbox_kafka::ensure_topics(&env.kafka, &[topic.as_str()]).await?;
    let ch = sink_clickhouse::client_for(&env.ch)?;
    // Each batch logged (as JSON) for the time budget of an event.
    let traced = env.traced_env();
    let relay_log = env.log_dir.join(format!("{table}_relay.log"));
    let consumer_log = env.log_dir.join(format!("{table}_consumer.log"));
    let (relay_bin, consumer_bin) = (
        env.bin_dir.join("producer_pg_to_kafka"),
        env.bin_dir.join("consumer_to_clickhouse"),
    );
    let launch = |program, args, log| Launch {
        program,
        args,
        env: &traced,
        log,
        gid: None,
    };
    let relay_args = match capture {
        Capture::Wal => wal_relay_args(env, &table),
        Capture::Outbox => relay_args(env, &table, false),
        Capture::FlagTable => flag_relay_args(env, &table, &topic),
    };
    let mut relay = Process::start("relay", launch(&relay_bin, &relay_args, &relay_log))?;
    let mut consumer_args = consumer_args(&topic, &table);
    if let Some(ms) = insert_floor_ms {
        consumer_args.extend(["--min-insert-interval-ms".to_string(), ms.to_string()]);
    }
    let mut consumer = Process::start(
        "consumer",
        launch(&consumer_bin, &consumer_args, &consumer_log),
    )?;
    let outbox = Outbox::new(&config).with_message_prefix(table.clone());
    // The hop probe's producer, connected before anything is timed (its
    // warm-up message is a row like the others).
    let probe_producer = crate::hops::producer(env)?;
    crate::hops::warm_up(&probe_producer, &topic).await?;
    // Without a floor between inserts, ClickHouse's share is measured
    // under the run's load too (its table created before anything is timed).
    let insert_probe_table = format!("{table}_iprobe");
    let insert_probe = match insert_floor_ms {
        Some(0) => Some((
            crate::hops::insert_probe_table(env, &insert_probe_table).await?,
            insert_probe_table.clone(),
        )),
        _ => None,
    };

    // Warm up: one event through, so start-up is not measured.
    write_events(
        &mut env.pool.get().await?,
        &outbox,
        capture,
        &topic,
        &table,
        0..1,
    )
    .await?;
    let warm_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = ch
            .query(&format!("SELECT count() FROM `{table}`"))
            .fetch_one::<u64>()
            .await
            .unwrap_or(0);
        if rows >= 1 {
            break;
        }
        if Instant::now() > warm_deadline || !relay.running() || !consumer.running() {
            bail!(
                "the pipeline did not deliver a first event within 2 minutes; see {}",
                env.log_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    say(format!(
        "latency at {rate} events/s for {length:?} (enqueue commit → row in ClickHouse)"
    ));
    let cpu_start = cpu_times();
    let mut cpu_end = None;
    let procs_start = cpu_snapshot(&relay, &consumer);
    // The consumer's log gives wall-clock times; this pair turns them into
    // instants of this process.
    let clock = (Instant::now(), std::time::SystemTime::now());
    let mut procs_end = Vec::new();
    let tap_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tap = tap_topic(&env.kafka.brokers, &topic, tap_stop.clone())?;

    let committed: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let writer = {
        let committed = committed.clone();
        let pool = env.pool.clone();
        let (topic, table) = (topic.clone(), table.clone());
        tokio::spawn(async move {
            let mut client = pool.get().await?;
            let mut pace = Pace::new(rate, length);
            let mut sent = 0usize;
            while let Some(due) = pace.next().await {
                if due <= sent {
                    continue;
                }
                let ids =
                    write_events(&mut client, &outbox, capture, &topic, &table, sent..due).await?;
                let at = Instant::now();
                let mut map = committed.lock().unwrap_or_else(|p| p.into_inner());
                for id in ids {
                    map.insert(id, at);
                }
                sent = due;
            }
            anyhow::Ok(sent)
        })
    };

    let probe = {
        let topic = topic.clone();
        tokio::spawn(async move {
            crate::hops::send_paced(&probe_producer, &topic, PROBE_RATE, length).await
        })
    };
    let insert_probe = insert_probe.map(|(client, probe_table)| {
        tokio::spawn(crate::hops::timed_inserts(
            client,
            probe_table,
            INSERT_PROBE_ROWS,
            INSERT_PROBE_EVERY,
            length,
        ))
    });

    // Poll ClickHouse for new rows, by position.
    let mut seen_at: HashMap<Uuid, Instant> = HashMap::new();
    // Every partition of the topic from the start, so each poll reads only
    // the rows past what it saw, through the table's (partition, offset)
    // key: a poll that scanned the whole table 200 times a second slowed
    // the very inserts it was timing.
    let mut after: HashMap<i32, i64> = (0..env.kafka.topic_partitions).map(|p| (p, -1)).collect();
    let mut writer = Some(writer);
    let mut expected = None;
    let mut drain_deadline = None;
    loop {
        let parts: Vec<String> = after
            .iter()
            .map(|(p, o)| format!("(kafka_partition = {p} AND kafka_offset > {o})"))
            .collect();
        let filter = format!("WHERE {}", parts.join(" OR "));
        let rows = ch
            .query(&format!(
                "SELECT event_id, kafka_partition, kafka_offset FROM `{table}` {filter}"
            ))
            .fetch_all::<Seen>()
            .await
            .context("polling clickhouse")?;
        let now = Instant::now();
        for row in rows {
            seen_at.entry(row.event_id).or_insert(now);
            let entry = after.entry(row.kafka_partition).or_insert(row.kafka_offset);
            *entry = (*entry).max(row.kafka_offset);
        }
        if let Some(handle) = writer.as_ref() {
            if handle.is_finished() {
                if let Some(handle) = writer.take() {
                    cpu_end = cpu_times();
                    procs_end = cpu_snapshot(&relay, &consumer);
                    expected = Some(handle.await??);
                    drain_deadline = Some(Instant::now() + Duration::from_secs(60));
                }
            }
        }
        if let Some(expected) = expected {
            let done = committed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .filter(|id| seen_at.contains_key(id))
                .count();
            if done >= expected {
                break;
            }
            if drain_deadline.is_some_and(|d| Instant::now() > d) {
                bail!(
                    "only {done} of {expected} events reached ClickHouse within 60 s after the run"
                );
            }
        }
        tokio::time::sleep(TABLE_CHECK_EVERY).await;
    }
    relay.stop(STOP_GRACE).await?;
    consumer.stop(STOP_GRACE).await?;
    tap_stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let tapped = tap
        .join()
        .map_err(|_| anyhow::anyhow!("the topic tap thread panicked"))?;
    let committed = committed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let written_at = written_from_log(&consumer_log, &topic, &tapped, &committed, &seen_at, clock)?;
    let probed = probe.await??;
    let hop_under_load_ms = delays_ms(&probed, &tapped.seen);
    if hop_under_load_ms.len() < probed.len() {
        bail!(
            "the hop probe: the tap read {} of {} messages back",
            hop_under_load_ms.len(),
            probed.len()
        );
    }
    let insert_under_load_ms = match insert_probe {
        Some(handle) => handle.await??,
        None => Vec::new(),
    };
    let in_kafka_at = tapped.seen;
    let since_commit = |arrivals: &HashMap<Uuid, Instant>| delays_ms(&committed, arrivals);
    let distinct: HashSet<&Uuid> = seen_at.keys().collect();
    let run = LatencyRun {
        latencies_ms: since_commit(&written_at),
        to_kafka_ms: since_commit(&in_kafka_at),
        cpu_busy_pct: busy_pct(cpu_start, cpu_end),
        cpu_s_per_1k: cpu_between(&procs_start, &procs_end, committed.len()),
        relay_budget: budget_of(
            &relay_log,
            "relay batch acknowledged",
            &["claim_ms", "publish_ms", "ack_ms"],
        ),
        consumer_budget: budget_of(
            &consumer_log,
            "sink batch acknowledged",
            &["poll_ms", "write_ms"],
        ),
        hop_under_load_ms,
        insert_under_load_ms,
    };
    say(format!(
        "latency at {rate} events/s: {} events, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} rows seen); \
         readable in Kafka: p50 {:.1} ms, p99 {:.1} ms; the hop under this load: p50 {:.1} ms, \
         p99 {:.1} ms; CPU {:.0}% busy",
        run.latencies_ms.len(),
        run.percentile(0.5),
        run.percentile(0.99),
        run.percentile(1.0),
        distinct.len(),
        run.to_kafka_percentile(0.5),
        run.to_kafka_percentile(0.99),
        quantile(&run.hop_under_load_ms, 0.5),
        quantile(&run.hop_under_load_ms, 0.99),
        run.cpu_busy_pct,
    ));
    let cpu: Vec<String> = run
        .cpu_s_per_1k
        .iter()
        .map(|(name, s)| format!("{name} {s:.3}"))
        .collect();
    say(format!(
        "latency at {rate} events/s: CPU s per 1,000 events: {}",
        cpu.join(", ")
    ));
    for (who, budget) in [
        ("relay", &run.relay_budget),
        ("consumer", &run.consumer_budget),
    ] {
        let stages: Vec<String> = budget
            .stages
            .iter()
            .map(|(stage, ms)| format!("{stage} {ms:.1}"))
            .collect();
        say(format!(
            "latency at {rate} events/s: {who}: {} batches of {:.1} events; the average event: {}",
            budget.batches,
            budget.mean_batch,
            stages.join(", ")
        ));
    }
    if !run.insert_under_load_ms.is_empty() {
        say(format!(
            "latency at {rate} events/s: a lone insert under this load: {} inserts, p50 {:.1} ms, \
             p99 {:.1} ms",
            run.insert_under_load_ms.len(),
            quantile(&run.insert_under_load_ms, 0.5),
            quantile(&run.insert_under_load_ms, 0.99),
        ));
        drop_ch_tables(env, &insert_probe_table).await;
    }
    if wal {
        drop_slot(env, &table).await;
    }
    drop_pg_tables(
        env,
        &[&table, &format!("{table}_dead"), &flag_table(&table)],
    )
    .await;
    drop_ch_tables(env, &table).await;
    Ok(run)
}
