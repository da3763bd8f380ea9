//! The relay: publishes pending events from PostgreSQL to Kafka.
//!
//! Default: the original demo, rows of `user_logins` with
//! `sent_to_kafka = false` → topic `user_events`. With `--source outbox`, the
//! events services enqueued in the outbox table.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use examples::{
    init_tracing, retry_startup, shutdown_on_signals, KafkaArgs, LogArgs, OpsArgs, OutboxTableArgs,
    PgArgs,
};
use outbox_core::{Health, Relay, RelayConfig, Source, Stage};
use outbox_kafka::KafkaBus;
use outbox_pg::{FlagTableConfig, FlagTableSource, OutboxConfig, PgOutboxSource};
use tracing::info;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SourceKind {
    /// A business table with a boolean "sent" column (the original demo).
    FlagTable,
    /// The outbox table written by `outbox_pg::Outbox::enqueue`.
    Outbox,
}

/// Publish pending events from PostgreSQL to Kafka; an event is marked done
/// only after the broker acknowledged it.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    pg: PgArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    ops: OpsArgs,
    /// What to read.
    #[arg(long, env = "OUTBOX_SOURCE", value_enum, default_value = "flag-table")]
    source: SourceKind,
    /// Flag table (with --source flag-table).
    #[arg(long, env = "OUTBOX_FLAG_TABLE", default_value = "user_logins")]
    table: String,
    /// Id column of the flag table.
    #[arg(long, env = "OUTBOX_FLAG_ID_COLUMN", default_value = "id")]
    id_column: String,
    /// Boolean "sent" column of the flag table.
    #[arg(long, env = "OUTBOX_FLAG_COLUMN", default_value = "sent_to_kafka")]
    flag_column: String,
    /// Column whose value is the message key (flag table).
    #[arg(long, env = "OUTBOX_FLAG_KEY_COLUMN", default_value = "username")]
    key_column: String,
    /// Topic the flag table's rows go to.
    #[arg(long, env = "OUTBOX_TOPIC", default_value = "user_events")]
    topic: String,
    #[command(flatten)]
    tables: OutboxTableArgs,
    /// Do not create the outbox tables at start (for a role without DDL rights).
    #[arg(long, env = "OUTBOX_NO_MIGRATE")]
    no_migrate: bool,
    /// How long a claim may wait for the broker before Postgres ends it and
    /// its lanes go to another relay (s).
    #[arg(long, env = "OUTBOX_CLAIM_TIMEOUT_SECS", default_value_t = OutboxConfig::default().claim_timeout.as_secs())]
    claim_timeout_secs: u64,
    /// Most events per batch.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = RelayConfig::default().batch_size)]
    batch_size: usize,
    /// Batches in flight at once, with a source whose claims never share a
    /// key (the outbox: each claim owns its lanes, so keys keep their
    /// order). A flag table has one.
    #[arg(long, env = "OUTBOX_IN_FLIGHT_BATCHES", default_value_t = RelayConfig::default().max_in_flight_batches)]
    in_flight_batches: usize,
    /// Exit once nothing is pending instead of waiting for new events.
    #[arg(long, env = "OUTBOX_DRAIN")]
    drain: bool,
    /// How often the outbox backlog gauges are refreshed (s; each refresh
    /// counts the pending events, one scan of the outbox table).
    #[arg(long, env = "OUTBOX_BACKLOG_INTERVAL_SECS", default_value_t = 15)]
    backlog_interval_secs: u64,
}

/// Where /metrics listens unless told otherwise.
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = examples::parse_cli();
    init_tracing(&cli.log);
    let drain = Duration::from_secs(cli.log.drain_timeout_secs);
    examples::exit_with(examples::finish(run(cli).await, drain).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let startup = Duration::from_secs(cli.log.startup_timeout_secs);
    let outbox_config = OutboxConfig {
        claim_timeout: Duration::from_secs(cli.claim_timeout_secs),
        ..cli.tables.config()
    }
    .validate()
    .context("invalid outbox configuration")?;
    let flag_config = FlagTableConfig {
        table: cli.table.clone(),
        id_column: cli.id_column.clone(),
        flag_column: cli.flag_column.clone(),
        key_column: Some(cli.key_column.clone()),
        topic: cli.topic.clone(),
        dead_letter_table: cli.tables.dead_letter_table.clone(),
        claim_timeout: Duration::from_secs(cli.claim_timeout_secs),
    }
    .validate()
    .context("invalid flag-table configuration")?;
    if cli.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if cli.in_flight_batches == 0 {
        anyhow::bail!("--in-flight-batches must be at least 1");
    }

    let shutdown = shutdown_on_signals(Duration::from_secs(cli.log.drain_timeout_secs));
    let health = Health::new([Stage::Source, Stage::Bus]);
    cli.ops
        .start(DEFAULT_METRICS_ADDR, health.clone(), shutdown.clone())
        .await?;

    let pg = cli.pg.config("producer_pg_to_kafka")?;
    let target = pg.target();
    let pool = pg.create_pool()?;
    retry_startup("postgres", startup, || {
        outbox_pg::check_connection(&pool, &target)
    })
    .await?;
    if !cli.no_migrate {
        let client = outbox_pg::connection(&pool, &target).await?;
        outbox_pg::migrate(&client, &outbox_config).await?;
    }
    health.up(Stage::Source);

    let kafka = cli.kafka.config("producer_pg_to_kafka")?;
    outbox_core::check_claim_outlives_publish(
        Duration::from_secs(cli.claim_timeout_secs),
        kafka.message_timeout,
    )?;
    let bus = KafkaBus::new(kafka.clone())?;
    retry_startup("kafka", startup, || bus.check_connection()).await?;
    if matches!(cli.source, SourceKind::FlagTable) {
        let topics = [cli.topic.as_str()];
        retry_startup("kafka", startup, || {
            outbox_kafka::ensure_topics(&kafka, &topics)
        })
        .await?;
    }
    health.up(Stage::Bus);

    let relay_config = RelayConfig {
        batch_size: cli.batch_size,
        stop_when_idle: cli.drain,
        max_in_flight_batches: cli.in_flight_batches,
        ..RelayConfig::default()
    };
    match cli.source {
        SourceKind::FlagTable => {
            info!(table = %cli.table, topic = %cli.topic, "relaying flag table");
            let source = FlagTableSource::new(pool, target, flag_config);
            run_relay(source, bus, relay_config, health, shutdown).await
        }
        SourceKind::Outbox => {
            info!(table = %cli.tables.outbox_table, "relaying outbox table");
            let interval = Duration::from_secs(cli.backlog_interval_secs.max(1));
            let admin = outbox_pg::OutboxAdmin::new(&outbox_config);
            examples::spawn_background(admin.report_backlog_every(
                pool.clone(),
                target.clone(),
                interval,
                shutdown.clone(),
            ));
            let source =
                PgOutboxSource::new(pool, target, outbox_config).listen_for_events(pg.clone());
            run_relay(source, bus, relay_config, health, shutdown).await
        }
    }
}

async fn run_relay<S: Source>(
    source: S,
    bus: KafkaBus,
    config: RelayConfig,
    health: Health,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let relay = Relay::new(source, bus, config).with_health(health);
    let stats = relay.run(shutdown).await?;
    info!(
        published = stats.published,
        dead_lettered = stats.dead_lettered,
        "producer finished"
    );
    println!(
        "published {} events ({} dead-lettered)",
        stats.published, stats.dead_lettered
    );
    Ok(())
}
