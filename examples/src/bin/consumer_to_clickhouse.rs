//! The consumer: reads Kafka and writes ClickHouse, each event once.
//!
//! Default: the original demo, topic `user_events` → table `user_logins`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use examples::{
    init_tracing, millis, retry_startup, shutdown_on_signals, ClickHouseArgs, GroupArgs, KafkaArgs,
    LogArgs, OpsArgs, PgArgs, UserLoginMapper,
};
use outbox_core::{Consume, ConsumeConfig, Health, Stage};
use outbox_kafka::{Assignment, ConsumerConfig, KafkaSubscription};
use outbox_pg::{PartitionLeaseConfig, PartitionLeases};
use sink_clickhouse::{ClickHouseSink, RawEventMapper, RowMapper};
use tracing::info;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AssignmentArg {
    /// Read every partition of the topic (one consumer per topic; exactly-once).
    AllPartitions,
    /// Let the broker's consumer group split partitions among consumers.
    Group,
    /// Share partitions with the other consumers of the group through
    /// PostgreSQL leases: each partition has one writer, and a dead
    /// consumer's partitions are taken over within the lease timeout.
    Leased,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RowFormat {
    /// The demo's `user_logins` columns parsed from the JSON payload.
    UserLogins,
    /// The whole event envelope (topic, key, payload, headers, created_at).
    Raw,
}

/// Read events from Kafka and write them to ClickHouse; Kafka positions move
/// only after ClickHouse accepted the rows, and rows already written are
/// recognised by their stored position.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    clickhouse: ClickHouseArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    pg: PgArgs,
    #[command(flatten)]
    ops: OpsArgs,
    /// How often the consumer-lag gauge is refreshed (s).
    #[arg(long, env = "OUTBOX_LAG_INTERVAL_SECS", default_value_t = 15)]
    lag_interval_secs: u64,
    /// With --assignment leased: how long a silent consumer keeps its partitions (ms).
    #[arg(long, env = "OUTBOX_LEASE_TIMEOUT_MS", default_value_t = millis(PartitionLeaseConfig::new("", "", 1).session_timeout))]
    lease_timeout_ms: u64,
    #[command(flatten)]
    group: GroupArgs,
    /// How partitions are obtained.
    #[arg(
        long,
        env = "OUTBOX_ASSIGNMENT",
        value_enum,
        default_value = "all-partitions"
    )]
    assignment: AssignmentArg,
    /// How records become rows.
    #[arg(
        long,
        env = "OUTBOX_ROW_FORMAT",
        value_enum,
        default_value = "user-logins"
    )]
    format: RowFormat,
    /// Most records per ClickHouse insert.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = ConsumeConfig::default().batch_size)]
    batch_size: usize,
    /// Longest wait to fill a batch (ms).
    #[arg(long, env = "OUTBOX_BATCH_WAIT_MS", default_value_t = millis(ConsumeConfig::default().max_wait))]
    batch_wait_ms: u64,
    /// After the first record of a batch, how long to keep collecting more
    /// (ms). Low load gets small batches soon; high load gets big ones
    /// anyway, because records pile up while the previous batch is written.
    #[arg(long, env = "OUTBOX_BATCH_LINGER_MS", default_value_t = millis(consumer_defaults().batch_linger))]
    batch_linger_ms: u64,
    /// How long the broker may hold a fetch that finds nothing (ms,
    /// `fetch.wait.max.ms`). tansu 0.6 waits it out on every fetch, so it adds
    /// to latency there; lower costs more idle fetches.
    #[arg(long, env = "OUTBOX_FETCH_WAIT_MS", default_value_t = millis(consumer_defaults().fetch_wait))]
    fetch_wait_ms: u64,
    /// Most bytes one fetch response may carry (`fetch.max.bytes`): less
    /// bounds memory while catching up a backlog, more catches up faster.
    #[arg(long, env = "OUTBOX_FETCH_MAX_BYTES", default_value_t = consumer_defaults().fetch_max_bytes)]
    fetch_max_bytes: u32,
    /// Kafka session timeout (ms).
    #[arg(long, env = "OUTBOX_SESSION_TIMEOUT_MS", default_value_t = millis(consumer_defaults().session_timeout))]
    session_timeout_ms: u64,
    /// Kafka max poll interval (ms): also how long a rejoin waits for a member that died.
    #[arg(long, env = "OUTBOX_MAX_POLL_INTERVAL_MS", default_value_t = millis(consumer_defaults().max_poll_interval))]
    max_poll_interval_ms: u64,
    /// Exit after this many seconds without any record.
    #[arg(long, env = "OUTBOX_EXIT_AFTER_IDLE_SECS")]
    exit_after_idle_secs: Option<u64>,
}

/// The Kafka consumer's defaults (the options below take theirs from here).
fn consumer_defaults() -> ConsumerConfig {
    ConsumerConfig::new("", Vec::<String>::new())
}

/// Where /metrics listens unless told otherwise (the relay's default + 1).
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9465";

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = examples::parse_cli();
    init_tracing(&cli.log);
    let drain = Duration::from_secs(cli.log.drain_timeout_secs);
    examples::exit_with(examples::finish(run(cli).await, drain).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.format {
        RowFormat::UserLogins => run_with(cli, UserLoginMapper).await,
        RowFormat::Raw => run_with(cli, RawEventMapper).await,
    }
}

async fn run_with<M: RowMapper>(cli: Cli, mapper: M) -> anyhow::Result<()> {
    let startup = Duration::from_secs(cli.log.startup_timeout_secs);
    let shutdown = shutdown_on_signals(Duration::from_secs(cli.log.drain_timeout_secs));
    let health = Health::new([Stage::Bus, Stage::Sink]);
    cli.ops
        .start(DEFAULT_METRICS_ADDR, health.clone(), shutdown.clone())
        .await?;
    let ch_config = cli.clickhouse.config()?;
    if cli.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    retry_startup("clickhouse", startup, || {
        sink_clickhouse::check_connection(&ch_config)
    })
    .await?;
    let sink = ClickHouseSink::new(ch_config, mapper).await?;
    health.up(Stage::Sink);

    let kafka = cli.kafka.config("consumer_to_clickhouse")?;
    let bus = outbox_kafka::KafkaBus::new(kafka.clone())?;
    retry_startup("kafka", startup, || bus.check_connection()).await?;
    drop(bus);
    // Subscribing to a topic that does not exist yet would wait silently.
    let topics = [cli.group.topic.as_str()];
    retry_startup("kafka", startup, || {
        outbox_kafka::ensure_topics(&kafka, &topics)
    })
    .await?;
    let mut consumer_config =
        ConsumerConfig::new(cli.group.group_id.clone(), [cli.group.topic.clone()]);
    consumer_config.session_timeout = Duration::from_millis(cli.session_timeout_ms);
    consumer_config.max_poll_interval = Duration::from_millis(cli.max_poll_interval_ms);
    consumer_config.batch_linger = Duration::from_millis(cli.batch_linger_ms);
    consumer_config.fetch_wait = Duration::from_millis(cli.fetch_wait_ms);
    consumer_config.fetch_max_bytes = cli.fetch_max_bytes;
    consumer_config.assignment = match cli.assignment {
        AssignmentArg::AllPartitions => Assignment::AllPartitions,
        AssignmentArg::Group => Assignment::Group,
        AssignmentArg::Leased => Assignment::Leased,
    };
    let mut subscription = KafkaSubscription::new(&kafka, consumer_config)?;
    health.up(Stage::Bus);
    let probe = outbox_kafka::LagProbe::new(&kafka, &cli.group.group_id, &cli.group.topic)?;
    examples::spawn_background(probe.report_every(
        Duration::from_secs(cli.lag_interval_secs.max(1)),
        shutdown.clone(),
    ));
    let mut lease = None;
    if matches!(cli.assignment, AssignmentArg::Leased) {
        let pg = cli.pg.config("consumer_to_clickhouse leases")?;
        let pool = pg.create_pool()?;
        let target = pg.target();
        retry_startup("postgres", startup, || {
            outbox_pg::check_connection(&pool, &target)
        })
        .await?;
        let partitions = std::cell::Cell::new(0);
        retry_startup("kafka", startup, || async {
            partitions.set(outbox_kafka::topic_partitions(&kafka, &cli.group.topic).await?);
            Ok::<_, outbox_kafka::BusError>(())
        })
        .await?;
        let partitions = partitions.get();
        let lease_config = PartitionLeaseConfig::new(
            cli.group.group_id.clone(),
            cli.group.topic.clone(),
            partitions,
        )
        .with_session_timeout(Duration::from_millis(cli.lease_timeout_ms));
        let (ownership, leasing) = PartitionLeases::new(pg, lease_config)?.start(shutdown.clone());
        lease = Some(ownership.lease.clone());
        subscription.follow_ownership(ownership);
        examples::spawn_critical("partition leases", leasing, shutdown.clone());
    }

    let config = ConsumeConfig {
        batch_size: cli.batch_size,
        max_wait: Duration::from_millis(cli.batch_wait_ms),
        stop_after_idle: cli.exit_after_idle_secs.map(Duration::from_secs),
        ..ConsumeConfig::default()
    };
    info!(topic = %cli.group.topic, group = %cli.group.group_id, "consuming");
    let mut consume = Consume::new(subscription, sink, config).with_health(health);
    if let Some(lease) = lease {
        consume = consume.with_lease(lease);
    }
    let stats = consume.run(shutdown).await?;
    println!(
        "wrote {} rows ({} duplicates skipped, {} dead-lettered)",
        stats.written, stats.duplicates, stats.dead_lettered
    );
    Ok(())
}
