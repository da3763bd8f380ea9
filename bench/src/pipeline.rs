//! Ours draining a backlog: the shipped relay and consumer binaries, measured
//! from outside (the steady-rate runs are in `latency`).

use std::time::{Duration, Instant};

use anyhow::bail;
use outbox_core::{Delivery, Position, Source};
use outbox_kafka::rdkafka::consumer::BaseConsumer;
use outbox_kafka::rdkafka::ClientConfig;
use outbox_pg::PgOutboxSource;

use crate::hops::{drop_ch_tables, drop_pg_tables, fill_outbox, outbox_config, topic_end};
use crate::latency::quantile;
use crate::{say, Env};
use test_support::{Launch, Process};

use crate::cpu::{per_1k, steady_per_1k};
use crate::steady::Progress;

/// One drain of a backlog.
pub struct BacklogRun {
    pub table: String,
    pub topic: String,
    /// Events per second once the first arrived (see [`Progress`]; the
    /// consumer's from its batch log, see [`crate::arrivals::drain_rate`]);
    /// over the whole run if it all arrived between two samples.
    pub rate: f64,
    /// Seconds from the binaries' start to the first event arriving.
    pub startup_s: f64,
    pub peak_rss_mb: f64,
    /// Seconds of CPU the binaries spent per 1,000 events (all of them
    /// together) from the first event seen, as the rate.
    pub cpu_s_per_1k: f64,
    /// Seconds of PostgreSQL CPU (all backends) per 1,000 events while the
    /// relays drained (NaN where not measured).
    pub pg_cpu_s_per_1k: f64,
    /// (seconds since start, events per second over the last sample).
    pub timeline: Vec<(f64, f64)>,
}

/// How often a drain's progress is sampled: often enough that the steady
/// rate of a 2 s drain is measured to a few per cent.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(50);

impl BacklogRun {
    pub(crate) fn new(
        table: String,
        topic: String,
        n: usize,
        elapsed: Duration,
        progress: &Progress,
        peak_rss_mb: f64,
        cpu_s_per_1k: f64,
    ) -> Self {
        let whole = n as f64 / elapsed.as_secs_f64();
        Self {
            table,
            topic,
            rate: progress.steady_rate(n as u64).unwrap_or(whole),
            startup_s: progress.first_seen().unwrap_or(elapsed.as_secs_f64()),
            peak_rss_mb,
            cpu_s_per_1k,
            pg_cpu_s_per_1k: f64::NAN,
            timeline: progress.timeline(0.5),
        }
    }
}

/// The relay binary's arguments: `source` (what it reads), then what every
/// run of `table` shares (its dead-letter table, batch size, partitions).
pub(crate) fn relay_args_for(env: &Env, table: &str, source: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = source.iter().map(|a| a.to_string()).collect();
    args.extend([
        "--dead-letter-table".to_string(),
        format!("{table}_dead"),
        "--batch-size".to_string(),
        env.relay_batch_size.to_string(),
        "--topic-partitions".to_string(),
        env.kafka.topic_partitions.to_string(),
    ]);
    args
}

pub(crate) fn relay_args(env: &Env, table: &str, drain: bool) -> Vec<String> {
    let mut args = relay_args_for(env, table, &["--source", "outbox", "--outbox-table", table]);
    if drain {
        args.push("--drain".into());
    }
    args
}

/// The slot, publication and message prefix of a WAL run on `table`.
pub(crate) fn wal_config(table: &str) -> outbox_pg::wal::WalConfig {
    outbox_pg::wal::WalConfig {
        slot: table.to_string(),
        publication: table.to_string(),
        message_prefix: table.to_string(),
        ..outbox_pg::wal::WalConfig::default()
    }
}

/// The relay binary streaming the events emitted under `table`'s prefix.
pub(crate) fn wal_relay_args(env: &Env, table: &str) -> Vec<String> {
    relay_args_for(
        env,
        table,
        &[
            "--source",
            "wal",
            "--wal-slot",
            table,
            "--wal-publication",
            table,
            "--wal-message-prefix",
            table,
            "--wal-messages-only",
            "--outbox-table",
            table,
        ],
    )
}

/// Drops a WAL run's slot and publication: a slot left behind pins the
/// server's WAL.
pub(crate) async fn drop_slot(env: &Env, table: &str) {
    if let Ok(client) = env.pool.get().await {
        if let Err(err) = test_support::drop_slot(&client, table).await {
            eprintln!("bench: {err:#}");
        }
        let _ = client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {table};
                 DELETE FROM outbox_wal_progress WHERE slot = '{table}';"
            ))
            .await;
    }
}

/// The consumer binary writing `topic` into the raw table `table`.
pub(crate) fn consumer_args(topic: &str, table: &str) -> Vec<String> {
    [
        "--topic",
        topic,
        "--group-id",
        table,
        "--clickhouse-table",
        table,
        "--clickhouse-dead-letter-table",
        &format!("{table}_dead"),
        "--format",
        "raw",
    ]
    .map(String::from)
    .to_vec()
}

pub(crate) fn watermark_reader(env: &Env) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &env.kafka.brokers)
        .set("log_level", "3")
        .create()?)
}

/// Enqueues `n` events, then times `relays` relay processes (`--drain`)
/// from their start until the last one exits with the outbox empty.
/// How long a binary may take to stop cleanly after SIGTERM.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(30);

/// Starts the shipped binary `bin` as a child of the benchmark.
pub(crate) fn start(
    env: &Env,
    label: &str,
    bin: &str,
    args: &[String],
    log: &std::path::Path,
) -> anyhow::Result<Process> {
    Process::start(
        label,
        Launch {
            program: &env.bin_dir.join(bin),
            args,
            env: &env.child_env(),
            log,
            gid: None,
        },
    )
}

pub async fn relay_backlog(env: &Env, relays: usize, n: usize) -> anyhow::Result<BacklogRun> {
    let table = env.name(&format!("relay{relays}"));
    let topic = table.clone();
    outbox_kafka::ensure_topics(&env.kafka, &[topic.as_str()]).await?;
    fill_outbox(env, &outbox_config(&table)?, &topic, n).await?;
    say(format!("relay ×{relays}: draining {n} events from {table}"));
    let pg_before = crate::cpu::postgres_seconds();
    let started = Instant::now();
    let mut procs = Vec::new();
    for i in 0..relays {
        procs.push(start(
            env,
            &format!("relay{i}"),
            "producer_pg_to_kafka",
            &relay_args(env, &table, true),
            &env.log_dir.join(format!("{table}_{i}.log")),
        )?);
    }
    let reader = watermark_reader(env)?;
    let mut progress = Progress::default();
    let mut at_first = None;
    let limit = Duration::from_secs(120 + (n / 2000) as u64);
    while procs.iter_mut().any(Process::running) {
        if started.elapsed() > limit {
            bail!("relay ×{relays} did not drain {n} events within {limit:?}");
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
        let now = started.elapsed().as_secs_f64();
        if let Ok(end) =
            tokio::task::block_in_place(|| topic_end(&reader, &topic, env.kafka.topic_partitions))
        {
            let end = u64::try_from(end).unwrap_or(0);
            progress.record(now, end);
            if end > 0 && at_first.is_none() {
                at_first = Some((procs.iter().map(Process::cpu_seconds).sum(), end));
            }
        }
    }
    let elapsed = started.elapsed();
    let mut peak: f64 = 0.0;
    let mut cpu = 0.0;
    for proc in &mut procs {
        let status = proc.wait(Duration::from_secs(5)).await?;
        if !status.success() {
            bail!(
                "{} exited with {status}; see {}",
                proc.label(),
                env.log_dir.display()
            );
        }
        peak = peak.max(proc.peak_rss_mb());
        cpu += proc.cpu_seconds();
    }
    let left: i64 = env
        .pool
        .get()
        .await?
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    let in_topic =
        tokio::task::block_in_place(|| topic_end(&reader, &topic, env.kafka.topic_partitions))?;
    if left != 0 || in_topic < n as i64 {
        bail!("relay ×{relays} left {left} events pending and published {in_topic} of {n}");
    }
    let cpu_s_per_1k = steady_per_1k(at_first, cpu, n);
    let mut run = BacklogRun::new(table, topic, n, elapsed, &progress, peak, cpu_s_per_1k);
    run.pg_cpu_s_per_1k = per_1k(crate::cpu::postgres_seconds() - pg_before, n);
    say(format!(
        "relay ×{relays}: {n} events in {:.2} s, the first after {:.2} s; steady {:.0} events/s \
         ({:.0} over the whole run), peak RSS {peak:.1} MiB, CPU {cpu_s_per_1k:.3} s per 1,000 events",
        elapsed.as_secs_f64(),
        run.startup_s,
        run.rate,
        n as f64 / elapsed.as_secs_f64(),
    ));
    Ok(run)
}

/// Drops the tables of a relay run. Its topic stays on the broker: tansu
/// 0.6 deletes every topic on any DeleteTopics request, the demo's and
/// other users' included.
pub async fn drop_relay_run(env: &Env, run: &BacklogRun) {
    drop_pg_tables(env, &[&run.table, &format!("{}_dead", run.table)]).await;
}

/// Times the consumer binary writing the `n` messages of `topic` into a new
/// ClickHouse table, from its start until the table holds them all.
pub async fn sink_backlog(env: &Env, topic: &str, n: usize) -> anyhow::Result<BacklogRun> {
    let table = env.name("sink");
    say(format!(
        "consumer: writing {n} messages of {topic} into ClickHouse {table}"
    ));
    let ch = sink_clickhouse::client_for(&env.ch)?;
    let log = env.log_dir.join(format!("{table}.log"));
    let started = Instant::now();
    // Each batch logged: the drain's rate is read from the consumer's log.
    let mut proc = Process::start(
        "consumer",
        Launch {
            program: &env.bin_dir.join("consumer_to_clickhouse"),
            args: &consumer_args(topic, &table),
            env: &env.traced_env(),
            log: &log,
            gid: None,
        },
    )?;
    let mut progress = Progress::default();
    let mut rows = 0;
    let mut at_first = None;
    let limit = Duration::from_secs(120 + (n / 1000) as u64);
    let elapsed = loop {
        if started.elapsed() > limit {
            bail!("the consumer wrote {rows} of {n} rows within {limit:?}");
        }
        if !proc.running() {
            bail!("the consumer exited early; see {}", env.log_dir.display());
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
        rows = ch
            .query(&format!("SELECT count() FROM `{table}`"))
            .fetch_one::<u64>()
            .await
            .unwrap_or(0);
        progress.record(started.elapsed().as_secs_f64(), rows);
        if rows > 0 && at_first.is_none() {
            at_first = Some((proc.cpu_seconds(), rows));
        }
        if rows >= n as u64 {
            break started.elapsed();
        }
    };
    proc.stop(STOP_GRACE).await?;
    let (rows, distinct) = ch
        .query(&format!(
            "SELECT count(), uniqExact(event_id) FROM `{table}`"
        ))
        .fetch_one::<(u64, u64)>()
        .await?;
    if rows != n as u64 || distinct != n as u64 {
        bail!("the consumer wrote {rows} rows, {distinct} distinct, for {n} messages");
    }
    let peak = proc.peak_rss_mb();
    let cpu_s_per_1k = steady_per_1k(at_first, proc.cpu_seconds(), n);
    drop_ch_tables(env, &table).await;
    let mut run = BacklogRun::new(
        table,
        topic.to_string(),
        n,
        elapsed,
        &progress,
        peak,
        cpu_s_per_1k,
    );
    let sampled = run.rate;
    if let Some(rate) = crate::arrivals::drain_rate(&std::fs::read_to_string(&log)?)? {
        run.rate = rate;
    }
    say(format!(
        "consumer: {n} rows in {:.2} s, the first after {:.2} s; steady {:.0} rows/s \
         (from its batches; {sampled:.0} from the table's count every {} ms, {:.0} over the \
         whole run), peak RSS {peak:.1} MiB, CPU {cpu_s_per_1k:.3} s per 1,000 rows",
        elapsed.as_secs_f64(),
        run.startup_s,
        run.rate,
        PROGRESS_EVERY.as_millis(),
        n as f64 / elapsed.as_secs_f64(),
    ));
    Ok(run)
}

/// Mean time of one claim + acknowledgement of 1000 events through
/// `PgOutboxSource`, in ms: on a new table (`None`), or on `table` after a
/// backlog went through it (its dead rows not yet vacuumed).
pub async fn claim_cost(env: &Env, table: Option<&str>, probes: usize) -> anyhow::Result<f64> {
    let owned;
    let table = match table {
        Some(table) => table,
        None => {
            owned = env.name("claim_probe");
            &owned
        }
    };
    let config = outbox_config(table)?;
    fill_outbox(env, &config, table, probes * 1000).await?;
    let source = PgOutboxSource::new(env.pool.clone(), env.pg.target(), config);
    let mut times = Vec::new();
    loop {
        let started = Instant::now();
        let Some(claimed) = source.claim(1000).await? else {
            break;
        };
        let acked = vec![
            Delivery::Acknowledged(Position {
                partition: 0,
                offset: 0
            });
            claimed.events.len()
        ];
        source.acknowledge(claimed, &acked).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    // The median: one claim that met a checkpoint or an autovacuum of the
    // table just filled would otherwise decide the figure.
    times.sort_by(f64::total_cmp);
    let ms = quantile(&times, 0.5);
    say(format!(
        "claim cost on {table}: median {ms:.2} ms per 1000-event claim + acknowledgement ({} batches, slowest {:.2} ms)",
        times.len(),
        quantile(&times, 1.0)
    ));
    if table.ends_with("claim_probe") {
        drop_pg_tables(env, &[table, &format!("{table}_dead")]).await;
    }
    Ok(ms)
}

/// `VACUUM` of an outbox table, as autovacuum would run it.
pub async fn vacuum(env: &Env, table: &str) -> anyhow::Result<()> {
    let client = env.pool.get().await?;
    client.batch_execute(&format!("VACUUM \"{table}\"")).await?;
    Ok(())
}
