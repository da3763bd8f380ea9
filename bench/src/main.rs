//! The benchmark (`make bench`): see README.md.
//!
//! In one run, against the local stack: the raw limit of each hop with
//! nothing of ours in the way, the original demo's relay design, and the
//! shipped relay and consumer binaries. Figures are reported as ratios to
//! the raw limits measured in the same run, because these machines are noisy.

mod arrivals;
mod budget;
mod cpu;
mod encoder;
mod hops;
mod latency;
mod pipeline;
mod report;
mod steady;
mod svg;
mod wal;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use outbox_kafka::KafkaConfig;
use outbox_pg::PgConfig;
use sink_clickhouse::ValidClickHouseConfig;
use uuid::Uuid;

/// How much work each phase does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Size {
    /// A few thousand events: checks that every phase runs (make test).
    Smoke,
    /// 50k-event backlog, 10 s latency runs: under 3 minutes.
    Small,
    /// 1M-event backlog, 30 s latency runs: the figures in docs/performance.md.
    Full,
}

/// Event counts and durations of one run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Backlog the relays drain and the consumer writes.
    pub backlog: usize,
    /// Messages of each raw hop.
    pub raw: usize,
    /// Rows the original design relays (it moves about 1k/s).
    pub naive: usize,
    /// Length of each steady-rate latency run.
    pub latency: Duration,
    /// Batches timed to measure the cost of one claim.
    pub claim_probes: usize,
}

impl Size {
    fn sizes(self) -> Sizes {
        match self {
            Size::Smoke => Sizes {
                backlog: 3_000,
                raw: 3_000,
                naive: 200,
                latency: Duration::from_secs(3),
                claim_probes: 3,
            },
            Size::Small => Sizes {
                backlog: 150_000,
                raw: 150_000,
                naive: 2_000,
                latency: Duration::from_secs(10),
                claim_probes: 10,
            },
            Size::Full => Sizes {
                backlog: 1_000_000,
                raw: 300_000,
                naive: 10_000,
                latency: Duration::from_secs(30),
                claim_probes: 20,
            },
        }
    }
}

/// Measure raw limits, the original relay design and ours; write a table,
/// target/bench/report.json and target/bench/report.svg.
#[derive(Debug, Parser)]
struct Cli {
    /// How much work: smoke (seconds), small (150k events, about 3 min), full (1M events).
    #[arg(long, value_enum, default_value = "full")]
    size: Size,
    /// Where the report goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// `--batch-size` of the relays.
    #[arg(long, default_value_t = 4000)]
    relay_batch_size: usize,
    /// Keep the tables of the run (dropped by default). Topics always stay:
    /// tansu 0.6 deletes every topic on any DeleteTopics request.
    #[arg(long)]
    keep: bool,
    /// Run only the latency phases (to tune latency knobs; the report then
    /// lacks the throughput figures and ratios).
    #[arg(long)]
    latency_only: bool,
    /// Run only the comparison of the table-driven encoder with the typed
    /// mapper (to tune the encoder; the report then holds only its figures).
    #[arg(long)]
    encoder_only: bool,
    #[command(flatten)]
    pg: examples::PgArgs,
    #[command(flatten)]
    kafka: examples::KafkaArgs,
    #[command(flatten)]
    clickhouse: examples::ClickHouseArgs,
}

/// What every phase needs: where the services are, where the binaries are.
pub struct Env {
    pub pg: PgConfig,
    pub pool: outbox_pg::deadpool_postgres::Pool,
    pub kafka: KafkaConfig,
    pub ch: ValidClickHouseConfig,
    pub bin_dir: PathBuf,
    pub log_dir: PathBuf,
    /// Prefix of every table and topic of this run.
    pub run: String,
    pub relay_batch_size: usize,
    pub keep: bool,
}

impl Env {
    /// A table/topic name of this run.
    pub fn name(&self, what: &str) -> String {
        format!("{}_{what}", self.run)
    }

    /// Environment of the binaries this benchmark starts (secrets go
    /// through the environment, never the command line).
    pub fn child_env(&self) -> Vec<(String, String)> {
        // The producer settings the raw hops use reach the relays too, so
        // that the two compare.
        let properties: Vec<String> = self
            .kafka
            .extra
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        vec![
            (
                "OUTBOX_KAFKA_LINGER_MS".into(),
                self.kafka.linger.as_millis().to_string(),
            ),
            (
                "OUTBOX_KAFKA_COMPRESSION".into(),
                self.kafka.compression.to_string(),
            ),
            ("OUTBOX_KAFKA_PROPERTIES".into(), properties.join(",")),
            ("OUTBOX_PG_HOST".into(), self.pg.host.clone()),
            ("OUTBOX_PG_PORT".into(), self.pg.port.to_string()),
            ("OUTBOX_PG_USER".into(), self.pg.user.clone()),
            ("OUTBOX_PG_PASSWORD".into(), self.pg.password.clone()),
            ("OUTBOX_PG_DATABASE".into(), self.pg.dbname.clone()),
            ("OUTBOX_KAFKA_BROKERS".into(), self.kafka.brokers.clone()),
            (
                "OUTBOX_TOPIC_PARTITIONS".into(),
                self.kafka.topic_partitions.to_string(),
            ),
            ("OUTBOX_CLICKHOUSE_URL".into(), self.ch.url.clone()),
            ("OUTBOX_CLICKHOUSE_USER".into(), self.ch.user.clone()),
            (
                "OUTBOX_CLICKHOUSE_PASSWORD".into(),
                self.ch.password.clone(),
            ),
            (
                "OUTBOX_CLICKHOUSE_DATABASE".into(),
                self.ch.database.clone(),
            ),
            // The children log into target/bench/logs; RUST_LOG of the
            // benchmark reaches them, to look into a phase.
            (
                "RUST_LOG".into(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ]
    }
}

impl Env {
    /// [`Env::child_env`] with each batch of the binaries logged as JSON
    /// (`outbox_core` at debug): what the time budget of an event and the
    /// consumer's drain rate are read from.
    pub fn traced_env(&self) -> Vec<(String, String)> {
        let mut env = self.child_env();
        env.push(("RUST_LOG".into(), "info,outbox_core=debug".into()));
        env.push(("OUTBOX_LOG_JSON".into(), "true".into()));
        env
    }
}

/// Progress line on stderr, so the table on stdout stays clean; on a
/// terminal, a spinner below the lines shows the phase running and its time.
pub fn say(text: impl AsRef<str>) {
    static PHASE: std::sync::OnceLock<indicatif::ProgressBar> = std::sync::OnceLock::new();
    let line = format!("[bench] {}", text.as_ref());
    if examples::progress::shown() {
        let phase = PHASE.get_or_init(|| examples::progress::spinner(""));
        phase.println(&line);
        phase.set_message(text.as_ref().to_string());
        phase.reset_elapsed();
    } else {
        eprintln!("{line}");
    }
}

/// The 200-byte payload of event `i`.
pub fn payload(i: usize) -> Vec<u8> {
    let mut text = format!("{{\"user\":\"user{}\",\"seq\":{i},\"pad\":\"", i % 1000);
    while text.len() < 198 {
        text.push('x');
    }
    text.push_str("\"}");
    text.into_bytes()
}

/// The key of event `i`: 1000 distinct keys.
pub fn key(i: usize) -> String {
    format!("user{}", i % 1000)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let sizes = cli.size.sizes();
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("no directory for the binaries")?
        .to_path_buf();
    for binary in ["producer_pg_to_kafka", "consumer_to_clickhouse"] {
        anyhow::ensure!(
            bin_dir.join(binary).exists(),
            "{} is not built: run `cargo build --release -p examples --bins` (or make bench)",
            bin_dir.join(binary).display()
        );
    }
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let log_dir = cli.out.join("logs");
    std::fs::create_dir_all(&log_dir)?;
    let pg = cli.pg.config("bench")?;
    let pool = pg.create_pool()?;
    outbox_pg::check_connection(&pool, &pg.target())
        .await
        .context("postgres is needed (make stack-up)")?;
    let ch = cli.clickhouse.config()?;
    sink_clickhouse::check_connection(&ch)
        .await
        .context("clickhouse is needed (make stack-up)")?;
    let kafka = cli.kafka.config("bench")?;
    outbox_kafka::KafkaBus::new(kafka.clone())?
        .check_connection()
        .await
        .context("kafka is needed (make stack-up)")?;
    let env = Env {
        pg,
        pool,
        kafka,
        ch,
        bin_dir,
        log_dir,
        run: format!("bench_{}", &Uuid::now_v7().simple().to_string()[24..]),
        relay_batch_size: cli.relay_batch_size,
        keep: cli.keep,
    };
    let machine = report::describe_machine(&env).await;
    say(format!(
        "run {} size={:?} backlog={} raw={} naive={} latency_run={:?} on {}",
        env.run,
        cli.size,
        sizes.backlog,
        sizes.raw,
        sizes.naive,
        sizes.latency,
        machine["summary"].as_str().unwrap_or("?")
    ));
    let mut report = report::Report::new(format!("{:?}", cli.size).to_lowercase(), machine);

    if cli.encoder_only {
        encoder_phase(&env, &sizes, &mut report).await?;
        report.derive_ratios();
        report.print_table();
        return Ok(());
    }
    if !cli.latency_only {
        throughput_phases(&env, &sizes, &mut report).await?;
    }

    // Latency at steady rates.
    report.figure(
        "consumer_min_insert_interval_ms",
        outbox_core::ConsumeConfig::default()
            .min_write_interval
            .as_secs_f64()
            * 1000.0,
    );
    for (rate, prefix) in [(1000u32, "e2e"), (5000u32, "e2e_5k")] {
        // The broker hop alone at the same rate, right before, on the same
        // broker: what the end-to-end figures cannot go below.
        let cpu = test_support::cpu::own_seconds();
        let raw = hops::raw_latency(&env, rate, sizes.latency).await?;
        // The producer and the tap that reads it back, both in this process
        // (warm-up and topic creation included).
        cpu_figure(
            &mut report,
            &format!("raw_{prefix}_cpu_s_per_1k"),
            cpu,
            raw.len(),
        );
        report.percentiles(&format!("raw_{prefix}_kafka"), &raw, &[0.5, 0.99]);
        if rate == 1000 {
            // ClickHouse alone at the consumer's pace at this rate (one
            // insert of about 20 rows every 20 ms).
            let inserts =
                hops::raw_small_inserts(&env, 20, Duration::from_millis(20), sizes.latency).await?;
            report.percentiles("raw_insert_small", &inserts, &[0.5, 0.99]);
        }
        if rate == 1000 {
            // The WAL source at the same rate, against the same floors.
            let run =
                latency::latency(&env, rate, sizes.latency, latency::Capture::Wal, None).await?;
            report.percentiles("wal_e2e", &run.latencies_ms, &[0.5, 0.99]);
            report.percentiles("wal_e2e_kafka", &run.to_kafka_ms, &[0.5, 0.99]);
            for (process, seconds) in &run.cpu_s_per_1k {
                report.figure(&format!("wal_e2e_cpu_s_per_1k_{process}"), *seconds);
            }
        }
        // The original demo's source, a flag table, at the same rate.
        let run =
            latency::latency(&env, rate, sizes.latency, latency::Capture::FlagTable, None).await?;
        report.percentiles(&format!("{prefix}_flag"), &run.latencies_ms, &[0.5, 0.99]);
        report.percentiles(
            &format!("{prefix}_flag_kafka"),
            &run.to_kafka_ms,
            &[0.5, 0.99],
        );
        report.percentiles(
            &format!("{prefix}_flag_hop_loaded"),
            &run.hop_under_load_ms,
            &[0.99],
        );
        // The latency-oriented insert cadence: an insert as soon as a batch
        // is read, against the default floor between inserts.
        let run =
            latency::latency(&env, rate, sizes.latency, latency::Capture::Outbox, Some(0)).await?;
        report.percentiles(&format!("{prefix}_floor0"), &run.latencies_ms, &[0.5, 0.99]);
        report.percentiles(&format!("{prefix}_floor0_kafka"), &run.to_kafka_ms, &[0.99]);
        report.percentiles(
            &format!("{prefix}_floor0_hop_loaded"),
            &run.hop_under_load_ms,
            &[0.99],
        );
        report.percentiles(
            &format!("{prefix}_floor0_insert_loaded"),
            &run.insert_under_load_ms,
            &[0.5, 0.99],
        );
        report.figure(
            &format!("{prefix}_floor0_inserts_per_min"),
            f64::from(rate + latency::PROBE_RATE) * 60.0 / run.consumer_budget.mean_batch,
        );
        let run =
            latency::latency(&env, rate, sizes.latency, latency::Capture::Outbox, None).await?;
        // One part per insert (the sink's tables have no partition key).
        report.figure(
            &format!("{prefix}_inserts_per_min"),
            f64::from(rate + latency::PROBE_RATE) * 60.0 / run.consumer_budget.mean_batch,
        );
        report.percentiles(prefix, &run.latencies_ms, &[0.5, 0.99, 1.0]);
        report.percentiles(&format!("{prefix}_kafka"), &run.to_kafka_ms, &[0.5, 0.99]);
        report.percentiles(
            &format!("{prefix}_hop_loaded"),
            &run.hop_under_load_ms,
            &[0.5, 0.99],
        );
        report.figure(&format!("{prefix}_events"), run.latencies_ms.len() as f64);
        report.figure(&format!("{prefix}_cpu_busy_pct"), run.cpu_busy_pct);
        for (process, seconds) in &run.cpu_s_per_1k {
            report.figure(&format!("{prefix}_cpu_s_per_1k_{process}"), *seconds);
        }
        for (who, budget) in [
            ("relay", &run.relay_budget),
            ("consumer", &run.consumer_budget),
        ] {
            report.figure(&format!("{prefix}_{who}_batch"), budget.mean_batch);
            for (stage, ms) in &budget.stages {
                report.figure(&format!("{prefix}_{who}_{stage}"), *ms);
            }
        }
        report.latencies(format!("{rate} events/s"), run.latencies_ms);
    }

    report.derive_ratios();
    report.print_table();
    report.print_verdicts();
    let json = cli.out.join("report.json");
    let svg = cli.out.join("report.svg");
    report.write_json(&json)?;
    report.write_svg(&svg)?;
    say(format!("wrote {} and {}", json.display(), svg.display()));
    Ok(())
}

/// Records as `key` this process's CPU since `since` per 1,000 of
/// `events`; gives the CPU now, for the next phase.
fn cpu_figure(report: &mut report::Report, key: &str, since: f64, events: usize) -> f64 {
    let now = test_support::cpu::own_seconds();
    report.figure(key, cpu::per_1k(now - since, events));
    now
}

/// The raw limits, the original design and ours draining backlogs.
async fn throughput_phases(
    env: &Env,
    sizes: &Sizes,
    report: &mut report::Report,
) -> anyhow::Result<()> {
    // The hops alone, run inside this process: its CPU is theirs.
    let cpu = test_support::cpu::own_seconds();
    let produced = hops::raw_produce(env, sizes.raw).await?;
    report.figure("raw_produce_eps", produced.rate());
    let cpu = cpu_figure(report, "raw_produce_cpu_s_per_1k", cpu, sizes.raw);
    report.figure(
        "raw_insert_rps",
        hops::raw_insert(env, sizes.raw).await?.rate(),
    );
    cpu_figure(report, "raw_insert_cpu_s_per_1k", cpu, sizes.raw);
    report.figure(
        "raw_claim_eps",
        hops::raw_claim(env, sizes.raw).await?.rate(),
    );

    // The original demo's design.
    report.figure(
        "naive_relay_eps",
        hops::naive_relay(env, sizes.naive).await?.rate(),
    );

    // Ours: one relay, then three, draining a backlog; the consumer after.
    let claim_empty = pipeline::claim_cost(env, None, sizes.claim_probes).await?;
    report.figure("claim_ms_empty", claim_empty);
    let one = pipeline::relay_backlog(env, 1, sizes.backlog).await?;
    report.figure("relay_eps", one.rate);
    report.figure("relay_startup_s", one.startup_s);
    report.figure("relay_rss_mb", one.peak_rss_mb);
    report.timeline("relay ×1 (events/s into Kafka)", one.timeline.clone());
    report.figure("relay_pg_cpu_s_per_1k", one.pg_cpu_s_per_1k);
    let claim_after = pipeline::claim_cost(env, Some(&one.table), sizes.claim_probes).await?;
    report.figure("claim_ms_after_backlog", claim_after);
    // What autovacuum does in the background (the outbox table asks for it
    // after every 10,000 deleted rows): the claim cost once it has run.
    pipeline::vacuum(env, &one.table).await?;
    let claim_vacuumed = pipeline::claim_cost(env, Some(&one.table), sizes.claim_probes).await?;
    report.figure("claim_ms_after_vacuum", claim_vacuumed);
    // The raw consumer reads the very topic the sink then reads: tansu's
    // fetch costs grow with how far a partition's end is from the read
    // position, so a limit taken on a smaller topic would not compare.
    let cpu = test_support::cpu::own_seconds();
    report.figure(
        "raw_consume_eps",
        hops::raw_consume(env, &one.topic, sizes.backlog)
            .await?
            .rate(),
    );
    cpu_figure(report, "raw_consume_cpu_s_per_1k", cpu, sizes.backlog);
    report.figure("relay_cpu_s_per_1k", one.cpu_s_per_1k);
    let sink = pipeline::sink_backlog(env, &one.topic, sizes.backlog).await?;
    report.figure("sink_rps", sink.rate);
    report.figure("sink_startup_s", sink.startup_s);
    report.figure("consumer_cpu_s_per_1k", sink.cpu_s_per_1k);
    report.figure("consumer_rss_mb", sink.peak_rss_mb);
    report.timeline("consumer (rows/s into ClickHouse)", sink.timeline.clone());
    pipeline::drop_relay_run(env, &one).await;
    // The WAL source on the same backlog: events emitted into the WAL.
    let wal = wal::wal_backlog(env, sizes.backlog).await?;
    report.figure("wal_relay_eps", wal.run.rate);
    report.figure("wal_relay_startup_s", wal.run.startup_s);
    report.figure("wal_relay_cpu_s_per_1k", wal.run.cpu_s_per_1k);
    report.figure("wal_relay_rss_mb", wal.run.peak_rss_mb);
    report.figure("wal_relay_pg_cpu_s_per_1k", wal.pg_cpu_s_per_1k);
    report.timeline(
        "relay, WAL source (events/s into Kafka)",
        wal.run.timeline.clone(),
    );
    let three = pipeline::relay_backlog(env, 3, sizes.backlog).await?;
    report.figure("relay3_eps", three.rate);
    report.figure("relay3_startup_s", three.startup_s);
    report.figure("relay3_cpu_s_per_1k", three.cpu_s_per_1k);
    report.figure(
        "relay3_rss_mb",
        three.peak_rss_mb, // the largest of the three
    );
    report.timeline("relay ×3 (events/s into Kafka)", three.timeline.clone());
    pipeline::drop_relay_run(env, &three).await;

    encoder_phase(env, sizes, report).await
}

/// Rows driven by the table against the typed mapper, same records.
async fn encoder_phase(
    env: &Env,
    sizes: &Sizes,
    report: &mut report::Report,
) -> anyhow::Result<()> {
    let (typed, table) = encoder::compare(env, sizes.raw).await?;
    say(format!(
        "sink: typed mapper {:.0} rows/s ({:.4} CPU s per 1,000), rows driven by the table {:.0} rows/s ({:.4})",
        typed.rows_per_s, typed.cpu_s_per_1k, table.rows_per_s, table.cpu_s_per_1k
    ));
    report.figure("typed_mapper_rps", typed.rows_per_s);
    report.figure("typed_mapper_cpu_s_per_1k", typed.cpu_s_per_1k);
    report.figure("table_rows_rps", table.rows_per_s);
    report.figure("table_rows_cpu_s_per_1k", table.cpu_s_per_1k);
    Ok(())
}
