//! The chaos harness: see README.md. It attacks the pipeline built from the
//! shipped binaries, then verifies no loss, no duplicate, no phantom and
//! per-key order from the real stores, and exits non-zero on a violation.

use std::collections::HashSet;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use uuid::Uuid;

mod attack;
mod fleet;
mod procs;
mod report;
mod services;
mod stores;
mod verify;
mod writer;

use fleet::Fleet;
use report::{Summary, Tally, Verdict};
use services::BrokerWatch;
use stores::Stores;
use writer::{write_events, Writes};

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
    /// What the relays read: the outbox table (`enqueue`), or the
    /// write-ahead log (`emit`, the table-free outbox, two writers whose
    /// commits of one key cross; one relay streams the slot, the others
    /// wait to take over).
    #[arg(long, value_enum, default_value_t = Source::Outbox)]
    source: Source,
    /// Which runs keep their tables and topic for inspection; the others drop
    /// them, so long runs do not leave gigabytes in the local stores.
    #[arg(long, value_enum, default_value_t = Keep::OnFailure)]
    keep: Keep,
}

/// What the relays read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    /// The outbox table.
    Outbox,
    /// The write-ahead log, through one replication slot.
    Wal,
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

/// In WAL runs, one writer transaction in this many is large (see
/// `writer::LARGE_EVENTS`): streamed while it runs, its savepoint rolled back.
const LARGE_ONE_IN: u32 = 300;
/// Rows of the captured table of a WAL run: about 1,000 per second of
/// attack, so that the load takes long enough to be attacked (a relay loads
/// some 10,000 rows a second here), within bounds that keep the set-up and
/// the final read of its topic short.
fn table_rows(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs().saturating_mul(1000))
        .unwrap_or(i32::MAX)
        .clamp(20_000, 300_000)
}

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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let name = format!("chaos_{}", &Uuid::now_v7().simple().to_string()[20..]);
    let (pg_host, pg_port) = (cli.pg_host.clone(), cli.pg_port);
    let outcome = tokio::select! {
        outcome = run(cli, name.clone()) => outcome,
        _ = tokio::signal::ctrl_c() => {
            // The run is dropped: its processes are killed with it. Its slot
            // would pin the server's WAL (and, on PostgreSQL 15, every
            // index's page reuse), so it goes too; the tables stay.
            stores::drop_slot_of(&pg_host, pg_port, &name).await;
            eprintln!("chaos: interrupted; the run's processes are stopped and its slot dropped, its tables {name}* are kept");
            return ExitCode::from(130);
        }
    };
    match outcome {
        Ok(Verdict::Passed) => ExitCode::SUCCESS,
        Ok(Verdict::Violated) => ExitCode::FAILURE,
        Ok(Verdict::DidNotDrain) => ExitCode::from(3),
        Err(err) => {
            eprintln!("chaos: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// One run: the stores and the processes, the writer and the attack, the
/// drain, the verdict from the stores.
async fn run(cli: Cli, name: String) -> anyhow::Result<Verdict> {
    let duration = parse_duration(&cli.duration)?;
    let drain_timeout = parse_duration(&cli.drain_timeout)?;
    let seed = cli.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
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
    let mut watch = BrokerWatch::new(&root);
    // A broker left wedged by an earlier run (a panic since its last start)
    // would fail this one before it begins.
    watch
        .restart_if_panicked(&script, &mut Tally::default())
        .await?;

    let table_size = table_rows(duration);
    let stores = Stores::create(&cli, &name, table_size).await?;
    let mut fleet = Fleet::build(&cli, &name, &bin_dir, &logs).await?;
    fleet.start()?;
    let writing = Arc::new(AtomicBool::new(true));
    let attempted = Arc::new(AtomicU64::new(0));
    let rolled_back = Arc::new(AtomicU64::new(0));
    // The WAL run has two writers, each at half the rate, taking each key's
    // next sequence number from a row they lock: their commits of one key
    // cross, and the sequence is the commit order.
    let writers: Vec<_> = match cli.source {
        Source::Outbox => vec![seed],
        Source::Wal => vec![seed, seed.rotate_left(17)],
    }
    .into_iter()
    .map(|writer_seed| {
        tokio::spawn(write_events(
            stores.pool.clone(),
            Writes {
                outbox: stores.outbox.clone(),
                ledger: stores.ledger.clone(),
                topic: name.clone(),
                table_free: cli.source == Source::Wal,
                events_per_second: cli.events_per_second
                    / if cli.source == Source::Wal { 2 } else { 1 },
                seed: writer_seed,
                captured: (cli.source == Source::Wal).then(|| (format!("{name}_rows"), table_size)),
                large_one_in: if cli.source == Source::Wal {
                    LARGE_ONE_IN
                } else {
                    0
                },
            },
            writing.clone(),
            attempted.clone(),
            rolled_back.clone(),
        ))
    })
    .collect();
    let mut tally = attack::attack_for(
        duration,
        &mut rng,
        &mut fleet,
        &mut watch,
        &script,
        !cli.no_service_restarts,
    )
    .await?;

    // Stop attacking; let everything drain.
    writing.store(false, Ordering::SeqCst);
    for writer in writers {
        writer.await??;
    }
    fleet.heal()?;
    let committed = stores.committed().await?;
    let drained = drain(
        &stores,
        &mut fleet,
        &mut watch,
        &script,
        &mut tally,
        committed.len(),
        drain_timeout,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await; // anything extra lands now
                                                      // The captured table (WAL runs): its load published whole, and its
                                                      // topic's first copies counting each row up to the table's rows.
    let table = if cli.source == Source::Wal {
        let loaded = stores.load_published().await?;
        let streamed = stores.streamed_in_progress().await?;
        fleet.stop().await;
        stores.drop_slot().await;
        let rows = stores.table_rows().await?;
        let (brokers, topic) = (cli.kafka_brokers.clone(), format!("{name}_rows"));
        let records =
            tokio::task::spawn_blocking(move || verify::read_records(&brokers, &topic)).await??;
        Some((loaded, streamed, verify::judge_table(&records, &rows)))
    } else {
        fleet.stop().await;
        None
    };

    let rows = stores.landed().await?;
    // Still in the outbox is undelivered, not lost: only a run that drained
    // can call a missing event lost.
    let still_pending = stores.still_pending().await?;
    // Missing from ClickHouse but in Kafka (acknowledged, not yet consumed)
    // is undelivered too; only an event in none of the stores is lost.
    let in_kafka = if verify::missing(&committed, &rows, &still_pending).is_empty() {
        HashSet::new()
    } else {
        watch.restart_if_panicked(&script, &mut tally).await?;
        read_back(&cli.kafka_brokers, &name).await?
    };
    let counts = verify::judge(&committed, &rows, &still_pending, &in_kafka);
    let verdict = match &table {
        Some((_, _, table)) if table.violations() > 0 => Verdict::Violated,
        Some((false, _, _)) if Verdict::of(&counts, drained) == Verdict::Passed => {
            Verdict::DidNotDrain
        }
        _ => Verdict::of(&counts, drained),
    };
    Summary {
        verdict,
        seed,
        duration,
        committed: committed.len(),
        rolled_back: rolled_back.load(Ordering::SeqCst),
        attempted: attempted.load(Ordering::SeqCst),
        in_clickhouse: rows.len(),
        counts: &counts,
        dead_letters: stores.dead_letters().await?,
        tally: &tally,
        unsafe_relay: cli.unsafe_relay,
        idempotence: cli.kafka_idempotence,
        source: match cli.source {
            Source::Outbox => "outbox",
            Source::Wal => "wal",
        },
    }
    .print();
    if let Some((loaded, streamed, table)) = &table {
        println!(
            "chaos: captured table rows={table_size} load_published={loaded} loaded={} changes={} gaps={} backwards={} mismatched={} streamed_in_progress={streamed}",
            table.loaded, table.changes, table.gaps, table.backwards, table.mismatched
        );
    }
    // A panic in the last seconds, after the watchdog last looked.
    if watch.panicked_since_last_look() {
        println!(
            "chaos: the local broker (tansu 0.6.0) panicked at the end of the run (see .stack/kafka/tansu.log); \
             its storage refuses every request afterwards: restart it with scripts/stack.sh crash kafka"
        );
    }
    let passed = verdict == Verdict::Passed;
    if cli.keep == Keep::Never || (cli.keep == Keep::OnFailure && passed) {
        stores.drop_tables().await;
    } else {
        println!(
            "chaos: kept tables {name}, {name}_dead, {name}_ledger and topic {name} for inspection"
        );
    }
    Ok(verdict)
}

/// Waits until the outbox is empty and ClickHouse holds `committed` rows,
/// restarting what exits (and a broker that panicked) meanwhile; false when
/// `timeout` passed first.
async fn drain(
    stores: &Stores,
    fleet: &mut Fleet,
    watch: &mut BrokerWatch,
    script: &Path,
    tally: &mut Tally,
    committed: usize,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    loop {
        let (pending, in_ch) = stores.progress().await?;
        if pending == 0 && in_ch >= committed as u64 {
            return Ok(true);
        }
        watch.restart_if_panicked(script, tally).await?;
        fleet.restart_exited(tally)?;
        if started.elapsed() > timeout {
            println!("chaos: drain timed out: pending={pending} in_clickhouse={in_ch}");
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The event ids on the run's topic; none (so those events count as lost)
/// when the topic cannot be read.
async fn read_back(brokers: &str, topic: &str) -> anyhow::Result<HashSet<Uuid>> {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    match tokio::task::spawn_blocking(move || verify::read_event_ids(&brokers, &topic)).await? {
        Ok(ids) => Ok(ids),
        Err(err) => {
            println!("chaos: cannot read the topic back ({err:#}); counting those events as lost");
            Ok(HashSet::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_captured_table_grows_with_the_run_within_bounds() {
        assert_eq!(table_rows(Duration::from_secs(75)), 75_000);
        assert_eq!(table_rows(Duration::from_secs(5)), 20_000);
        assert_eq!(table_rows(Duration::from_secs(1800)), 300_000);
        assert_eq!(table_rows(Duration::MAX), 300_000);
    }
}
