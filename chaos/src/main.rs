//! The chaos harness: see README.md. It attacks the pipeline built from the
//! shipped binaries, then verifies no loss, no duplicate, no phantom and
//! per-key order from the real stores, and exits non-zero on a violation.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use outbox_pg::{migrate, OutboxConfig, PgConfig};
use uuid::Uuid;

mod attack;
mod procs;
mod services;
mod verify;
mod writer;

use procs::{kafka_port, Proc, ServicePath, CONSUMER_GID, RELAY_GID};
use services::BrokerWatch;
use verify::{Counts, Landed};
use writer::write_events;

/// Attack the pipeline with kills, stops and service restarts, then verify
/// its guarantees from PostgreSQL and ClickHouse.
#[derive(Debug, Parser)]
struct Cli {
    /// How long to attack: seconds, or with a unit (90s, 3m, 30m).
    #[arg(long, default_value = "150s")]
    duration: String,
    /// Seed of every random choice (printed; a random one when absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Events the writer commits per second, roughly.
    #[arg(long, default_value_t = 200)]
    events_per_second: u32,
    /// Passed to the consumers; 0 turns off their recognition of events the
    /// relay published twice (a deliberately broken variant).
    #[arg(long, default_value_t = 100_000)]
    dedup_window: usize,
    /// Do not restart tansu, PostgreSQL and ClickHouse.
    #[arg(long)]
    no_service_restarts: bool,
    /// Run the deliberately broken `unsafe_relay` (deletes before publishing,
    /// no lanes) instead of the shipped relay: the run must then fail.
    #[arg(long)]
    unsafe_relay: bool,
    /// How long the pipeline may take to drain after the attack before the
    /// run is called DID-NOT-DRAIN (or FAIL, when a violation is already certain).
    #[arg(long, default_value = "300s")]
    drain_timeout: String,
    /// PostgreSQL host.
    #[arg(long, env = "OUTBOX_PG_HOST", default_value = "127.0.0.1")]
    pg_host: String,
    /// PostgreSQL port.
    #[arg(long, env = "OUTBOX_PG_PORT", default_value_t = 5432)]
    pg_port: u16,
    /// Kafka bootstrap servers.
    #[arg(long, env = "OUTBOX_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Run the relays with the idempotent producer. Off by default: librdkafka's
    /// idempotent producer bumps its epoch after a message timeout, which these
    /// attacks cause, and the local broker (tansu 0.6) panics on every produce
    /// with an epoch it did not hand out, for as long as that producer lives.
    /// Turn it on against Apache Kafka. The guarantees do not depend on it.
    #[arg(
        long,
        env = "OUTBOX_KAFKA_IDEMPOTENCE",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    kafka_idempotence: bool,
    /// ClickHouse HTTP endpoint.
    #[arg(
        long,
        env = "OUTBOX_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    clickhouse_url: String,
    /// Which runs keep their tables and topic for inspection; the others drop
    /// them, so long runs do not leave gigabytes in the local stores.
    #[arg(long, value_enum, default_value_t = Keep::OnFailure)]
    keep: Keep,
}

/// Which runs keep what they wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Keep {
    /// Every run keeps its tables and topic.
    Always,
    /// A run that did not pass keeps them; a passing run drops them.
    OnFailure,
    /// Every run drops them (for runs that are meant to fail).
    Never,
}

/// Lanes of a relay are handed over after this long.
const CLAIM_TIMEOUT_SECS: u64 = 5;
/// A consumer's partitions move after this long.
const LEASE_TIMEOUT_MS: u64 = 4000;
const KEYS: usize = 32;
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number
        .parse()
        .with_context(|| format!("bad duration {text:?}"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value * 60),
        "h" => Duration::from_secs(value * 3600),
        other => bail!("unknown duration unit {other:?} (use s, m or h)"),
    })
}

#[derive(Default)]
struct Tally {
    relay_kills: u32,
    relay_stops: u32,
    consumer_kills: u32,
    long_pauses: u32,
    unexpected_exits: u32,
    service_restarts: BTreeMap<&'static str, u32>,
    broker_panic_restarts: u32,
    /// Paths cut (blackholed or reset), by process kind and service.
    partitions: BTreeMap<String, u32>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(Verdict::Passed) => ExitCode::SUCCESS,
        Ok(Verdict::Violated) => ExitCode::FAILURE,
        Ok(Verdict::DidNotDrain) => ExitCode::from(3),
        Err(err) => {
            eprintln!("chaos: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Verdict> {
    let duration = parse_duration(&cli.duration)?;
    let drain_timeout = parse_duration(&cli.drain_timeout)?;
    let seed = cli.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let name = format!("chaos_{}", &Uuid::now_v7().simple().to_string()[20..]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("no directory for the binaries")?
        .to_path_buf();
    let logs = root.join(".stack").join("chaos").join(&name);
    std::fs::create_dir_all(&logs)?;
    println!(
        "chaos: name={name} seed={seed} duration={duration:?} logs={}",
        logs.display()
    );
    let script = root.join("scripts/stack.sh");
    let mut broker_watch = BrokerWatch::new(&root);
    // A broker left wedged by an earlier run (a panic since its last start)
    // would fail this one before it begins.
    broker_watch
        .restart_if_panicked(&script, &mut Tally::default())
        .await?;

    // The stores.
    let pg = PgConfig {
        host: cli.pg_host.clone(),
        port: cli.pg_port,
        ..PgConfig::default()
    };
    let pool = pg.create_pool()?;
    let outbox_config = OutboxConfig {
        table: name.clone(),
        dead_letter_table: format!("{name}_dead"),
        claim_timeout: Duration::from_secs(CLAIM_TIMEOUT_SECS),
        ..OutboxConfig::default()
    }
    .validate()?;
    let ledger = format!("{name}_ledger");
    {
        let client = pool.get().await?;
        migrate(&client, &outbox_config).await?;
        client
            .batch_execute(&format!(
                "CREATE TABLE {ledger} (event_id uuid PRIMARY KEY)"
            ))
            .await?;
    }
    let kafka = outbox_kafka::KafkaConfig {
        brokers: cli.kafka_brokers.clone(),
        topic_partitions: 4,
        idempotence: cli.kafka_idempotence,
        ..outbox_kafka::KafkaConfig::default()
    };
    outbox_kafka::ensure_topics(&kafka, &[name.as_str()]).await?;

    // The processes.
    let env = vec![
        ("OUTBOX_PG_HOST".to_string(), cli.pg_host.clone()),
        ("OUTBOX_PG_PORT".to_string(), cli.pg_port.to_string()),
        (
            "OUTBOX_KAFKA_BROKERS".to_string(),
            cli.kafka_brokers.clone(),
        ),
        (
            "OUTBOX_CLICKHOUSE_URL".to_string(),
            cli.clickhouse_url.clone(),
        ),
        // A binary restarted while a service is down waits for it instead of
        // exiting at its start-up check.
        ("OUTBOX_STARTUP_TIMEOUT_SECS".to_string(), "300".to_string()),
        (
            "OUTBOX_KAFKA_IDEMPOTENCE".to_string(),
            cli.kafka_idempotence.to_string(),
        ),
    ];
    let relay_program = bin_dir.join(if cli.unsafe_relay {
        "unsafe_relay"
    } else {
        "producer_pg_to_kafka"
    });
    let relay_args: Vec<String> = if cli.unsafe_relay {
        ["--outbox-table", &name, "--batch-size", "200"]
            .map(String::from)
            .to_vec()
    } else {
        [
            "--source",
            "outbox",
            "--outbox-table",
            &name,
            "--dead-letter-table",
            &format!("{name}_dead"),
            "--claim-timeout-secs",
            &CLAIM_TIMEOUT_SECS.to_string(),
            // Below the claim timeout: a stalled relay's publish ends before
            // another relay may take its events (see GUARANTEES.md).
            "--kafka-message-timeout-ms",
            &(CLAIM_TIMEOUT_SECS * 1000 * 4 / 5).to_string(),
            "--batch-size",
            "200",
        ]
        .map(String::from)
        .to_vec()
    };
    for program in [&relay_program, &bin_dir.join("consumer_to_clickhouse")] {
        if !program.exists() {
            bail!(
                "{} is not built: run `cargo build -p examples -p chaos --bins` first",
                program.display()
            );
        }
    }
    // Every process reaches PostgreSQL (and a consumer ClickHouse) through
    // a proxy of its own, so one process at a time can be cut off. Kafka is
    // reached directly (a client reconnects to the broker's advertised
    // address, so a proxy would not sit on its data path): each process
    // runs with a group id of its own, by which the packet filter cuts it.
    let kafka_port = kafka_port(&cli.kafka_brokers)?;
    let filter = Arc::new(
        netfault::PacketFilter::install("OUTBOX_CHAOS", kafka_port)
            .context("the harness cuts Kafka paths in the packet filter")?,
    );
    let pg_upstream = format!("{}:{}", cli.pg_host, cli.pg_port);
    let ch_upstream = cli
        .clickhouse_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut relays: Vec<Proc> = Vec::new();
    for i in 0..3 {
        relays.push(Proc {
            label: format!("relay{i}"),
            program: relay_program.clone(),
            args: relay_args.clone(),
            log: logs.join(format!("relay{i}.log")),
            child: None,
            stopped: false,
            restart_at: None,
            paths: vec![
                ServicePath::to("postgres", &pg_upstream).await?,
                ServicePath::kafka(&filter, RELAY_GID + i)?,
            ],
            gid: RELAY_GID + i,
        });
    }
    let mut consumers: Vec<Proc> = Vec::new();
    for i in 0..2 {
        consumers.push(Proc {
            label: format!("consumer{i}"),
            program: bin_dir.join("consumer_to_clickhouse"),
            args: [
                "--topic",
                &name,
                "--clickhouse-table",
                &name,
                "--clickhouse-dead-letter-table",
                &format!("{name}_dead"),
                "--group-id",
                &name,
                "--format",
                "raw",
                "--assignment",
                "leased",
                "--lease-timeout-ms",
                &LEASE_TIMEOUT_MS.to_string(),
                "--batch-size",
                "500",
                "--dedup-window",
                &cli.dedup_window.to_string(),
            ]
            .map(String::from)
            .to_vec(),
            log: logs.join(format!("consumer{i}.log")),
            child: None,
            stopped: false,
            restart_at: None,
            paths: vec![
                ServicePath::to("postgres", &pg_upstream).await?,
                ServicePath::to("clickhouse", &ch_upstream).await?,
                ServicePath::kafka(&filter, CONSUMER_GID + i)?,
            ],
            gid: CONSUMER_GID + i,
        });
    }
    for proc in relays.iter_mut().chain(consumers.iter_mut()) {
        proc.start(&env)?;
    }

    // The writer.
    let writing = Arc::new(AtomicBool::new(true));
    let attempted = Arc::new(AtomicU64::new(0));
    let rolled_back = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_events(
        pool.clone(),
        outbox_config.clone(),
        ledger.clone(),
        name.clone(),
        cli.events_per_second,
        seed,
        writing.clone(),
        attempted.clone(),
        rolled_back.clone(),
    ));

    // The attack.
    let mut tally = Tally::default();
    let started = Instant::now();
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(rng.u64(1500..5000))).await;
        broker_watch
            .restart_if_panicked(&script, &mut tally)
            .await?;
        attack::tend(&mut relays, &mut consumers, &mut tally, started, &env)?;
        attack::strike(
            &mut rng,
            &mut relays,
            &mut consumers,
            &mut tally,
            started,
            &script,
            !cli.no_service_restarts,
        )
        .await?;
    }

    // Stop attacking; let everything drain.
    writing.store(false, Ordering::SeqCst);
    writer.await??;
    for proc in relays.iter_mut().chain(consumers.iter_mut()) {
        for path in &mut proc.paths {
            path.set(netfault::Fault::Pass)?;
            path.heal_at = None;
        }
        if proc.stopped {
            proc.signal("-CONT");
            proc.stopped = false;
        }
        if !proc.running() {
            proc.start(&env)?;
        }
    }
    let committed: HashSet<Uuid> = {
        let client = pool.get().await?;
        client
            .query(&format!("SELECT event_id FROM {ledger}"), &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect()
    };
    let ch = sink_clickhouse::client_for(&sink_clickhouse::ClickHouseConfig {
        url: cli.clickhouse_url.clone(),
        ..sink_clickhouse::ClickHouseConfig::default()
    })?;
    let drain_started = Instant::now();
    let mut drained = true;
    loop {
        let pending: i64 = pool
            .get()
            .await?
            .query_one(&format!("SELECT count(*) FROM {name}"), &[])
            .await?
            .get(0);
        let in_ch: u64 = ch
            .query(&format!("SELECT count() FROM `{name}`"))
            .fetch_one::<u64>()
            .await
            .unwrap_or(0);
        if pending == 0 && in_ch >= committed.len() as u64 {
            break;
        }
        broker_watch
            .restart_if_panicked(&script, &mut tally)
            .await?;
        for proc in relays.iter_mut().chain(consumers.iter_mut()) {
            if proc.exited() {
                tally.unexpected_exits += 1;
                proc.start(&env)?;
            }
        }
        if drain_started.elapsed() > drain_timeout {
            println!("chaos: drain timed out: pending={pending} in_clickhouse={in_ch}");
            drained = false;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await; // anything extra lands now
    for proc in relays.iter_mut().chain(consumers.iter_mut()) {
        proc.signal("-TERM");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for proc in relays.iter_mut().chain(consumers.iter_mut()) {
        proc.kill();
    }

    // Verify from the stores.
    let mut rows = ch
        .query(&format!(
            "SELECT event_id, payload, kafka_partition, kafka_offset FROM `{name}`"
        ))
        .fetch_all::<Landed>()
        .await?;
    rows.sort_by_key(|r| (r.kafka_partition, r.kafka_offset));
    // Still in the outbox is undelivered, not lost: only a run that drained
    // can call a missing event lost.
    let still_pending: HashSet<Uuid> = pool
        .get()
        .await?
        .query(&format!("SELECT event_id FROM {name}"), &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    // Missing from ClickHouse but in Kafka (acknowledged, not yet consumed)
    // is undelivered too; only an event in none of the stores is lost.
    let in_kafka = if verify::missing(&committed, &rows, &still_pending).is_empty() {
        HashSet::new()
    } else {
        broker_watch
            .restart_if_panicked(&script, &mut tally)
            .await?;
        let brokers = cli.kafka_brokers.clone();
        let topic = name.clone();
        match tokio::task::spawn_blocking(move || verify::read_event_ids(&brokers, &topic)).await? {
            Ok(ids) => ids,
            Err(err) => {
                println!(
                    "chaos: cannot read the topic back ({err:#}); counting those events as lost"
                );
                HashSet::new()
            }
        }
    };
    let Counts {
        lost,
        duplicated,
        phantom,
        out_of_order,
        undelivered,
    } = verify::judge(&committed, &rows, &still_pending, &in_kafka);
    let dead_pg: i64 = pool
        .get()
        .await?
        .query_one(&format!("SELECT count(*) FROM {name}_dead"), &[])
        .await?
        .get(0);
    let dead_ch: u64 = ch
        .query(&format!("SELECT count() FROM `{name}_dead`"))
        .fetch_one::<u64>()
        .await
        .unwrap_or(0);
    let restarts: Vec<String> = tally
        .service_restarts
        .iter()
        .map(|(service, n)| format!("{service}:{n}"))
        .collect();
    let violated = lost > 0 || duplicated > 0 || phantom > 0 || out_of_order > 0;
    // A panic in the last seconds, after the watchdog last looked.
    let broker_broke = broker_watch.panicked_since_last_look();
    let verdict = match (violated, drained) {
        (true, _) => "FAIL",
        (false, true) => "PASS",
        (false, false) => "DID-NOT-DRAIN",
    };
    println!(
        "chaos: {verdict} seed={seed} duration={}s committed={} rolled_back={} in_clickhouse={} lost={lost} duplicated={duplicated} phantom={phantom} out_of_order={out_of_order} undelivered={undelivered} dead_letters={} relay_kills={} relay_stops={} consumer_kills={} consumer_long_pauses={} unexpected_exits={} service_restarts=[{}] partitions=[{}] broker_panic_restarts={} relay={} idempotence={}",
        duration.as_secs(),
        committed.len(),
        rolled_back.load(Ordering::SeqCst),
        rows.len(),
        dead_pg + i64::try_from(dead_ch).unwrap_or(i64::MAX),
        tally.relay_kills,
        tally.relay_stops,
        tally.consumer_kills,
        tally.long_pauses,
        tally.unexpected_exits,
        restarts.join(" "),
        tally
            .partitions
            .iter()
            .map(|(what, n)| format!("{what}={n}"))
            .collect::<Vec<_>>()
            .join(" "),
        tally.broker_panic_restarts,
        if cli.unsafe_relay { "unsafe" } else { "shipped" },
        if cli.kafka_idempotence { "on" } else { "off" },
    );
    println!(
        "chaos: attempted events={}",
        attempted.load(Ordering::SeqCst)
    );
    if broker_broke {
        println!(
            "chaos: the local broker (tansu 0.6.0) panicked at the end of the run (see .stack/kafka/tansu.log); \
             its storage refuses every request afterwards: restart it with scripts/stack.sh crash kafka"
        );
    }
    let passed = !violated && drained;
    if cli.keep == Keep::Never || (cli.keep == Keep::OnFailure && passed) {
        drop_run(&pool, &ch, &name).await;
    } else {
        println!(
            "chaos: kept tables {name}, {name}_dead, {name}_ledger and topic {name} for inspection"
        );
    }
    if violated {
        return Ok(Verdict::Violated);
    }
    Ok(if drained {
        Verdict::Passed
    } else {
        Verdict::DidNotDrain
    })
}

/// How a run ended.
enum Verdict {
    Passed,
    Violated,
    DidNotDrain,
}

/// Drops what a run wrote: its PostgreSQL and ClickHouse tables. Best
/// effort: a failure is printed, the verdict stands.
///
/// Its topic is left on the broker: tansu 0.6 deletes *every* topic on any
/// DeleteTopics request, so deleting this one would make every other topic
/// on the shared broker (the demo's `user_events` among them) start over at
/// offset 0, which their consumers rightly refuse (an offset regression).
async fn drop_run(pool: &outbox_pg::deadpool_postgres::Pool, ch: &clickhouse::Client, name: &str) {
    let pg = async {
        let client = pool.get().await?;
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {name}, {name}_dead, {name}_schema_version, {name}_ledger"
            ))
            .await?;
        anyhow::Ok(())
    };
    if let Err(err) = pg.await {
        println!("chaos: could not drop the PostgreSQL tables of {name}: {err:#}");
    }
    for table in [name.to_string(), format!("{name}_dead")] {
        if let Err(err) = ch
            .query(&format!("DROP TABLE IF EXISTS `{table}`"))
            .execute()
            .await
        {
            println!("chaos: could not drop the ClickHouse table {table}: {err}");
        }
    }
}
