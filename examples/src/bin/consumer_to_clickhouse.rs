//! The consumer: reads Kafka and writes ClickHouse, each event once.
//!
//! Default: the original demo, topic `user_events` → table `user_logins`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use examples::{
    init_tracing, retry_startup, shutdown_on_signals, AssignmentArg, ClickHouseArgs, ConsumerArgs,
    KafkaArgs, LogArgs, OpsArgs, PgArgs, RowFormat, UserLoginMapper,
};
use outbox_core::{Consume, Health, Stage};
use outbox_kafka::{KafkaBus, KafkaSubscription, LagProbe};
use outbox_pg::PartitionLeases;
use sink_clickhouse::{ClickHouseSink, RawEventMapper, RowMapper};
use tracing::info;

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
    #[command(flatten)]
    consumer: ConsumerArgs,
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
    match cli.consumer.format {
        RowFormat::UserLogins => run_with(cli, UserLoginMapper).await,
        RowFormat::Raw => run_with(cli, RawEventMapper).await,
    }
}

async fn run_with<M: RowMapper>(cli: Cli, mapper: M) -> anyhow::Result<()> {
    let startup = Duration::from_secs(cli.log.startup_timeout_secs);
    let config = cli.consumer.consume_config()?;
    let ch_config = cli.clickhouse.config()?;
    let shutdown = shutdown_on_signals(Duration::from_secs(cli.log.drain_timeout_secs));
    let health = Health::new([Stage::Bus, Stage::Sink]);
    cli.ops
        .start(DEFAULT_METRICS_ADDR, health.clone(), shutdown.clone())
        .await?;
    retry_startup("clickhouse", startup, || {
        sink_clickhouse::check_connection(&ch_config)
    })
    .await?;
    let sink = ClickHouseSink::new(ch_config, mapper).await?;
    health.up(Stage::Sink);

    let kafka = cli.kafka.config("consumer_to_clickhouse")?;
    let bus = KafkaBus::new(kafka.clone())?;
    retry_startup("kafka", startup, || bus.check_connection()).await?;
    drop(bus);
    // Subscribing to a topic that does not exist yet would wait silently.
    let topic = cli.consumer.group.topic.as_str();
    let topics = [topic];
    retry_startup("kafka", startup, || {
        outbox_kafka::ensure_topics(&kafka, &topics)
    })
    .await?;
    let subscription = KafkaSubscription::new(&kafka, cli.consumer.consumer_config())?;
    health.up(Stage::Bus);
    let probe = LagProbe::new(&kafka, &cli.consumer.group.group_id, topic)?;
    examples::spawn_background(probe.report_every(cli.consumer.lag_interval(), shutdown.clone()));

    let mut consume = Consume::new(subscription, sink, config).with_health(health);
    if cli.consumer.assignment == AssignmentArg::Leased {
        let pg = cli.pg.config("consumer_to_clickhouse leases")?;
        let (target, pool) = (pg.target(), pg.create_pool()?);
        retry_startup("postgres", startup, || {
            outbox_pg::check_connection(&pool, &target)
        })
        .await?;
        let partitions = retry_startup("kafka", startup, || {
            outbox_kafka::topic_partitions(&kafka, topic)
        })
        .await?;
        let leases = PartitionLeases::new(pg, cli.consumer.lease_config(partitions))?;
        let (ownership, leasing) = leases.start(shutdown.clone());
        examples::spawn_critical("partition leases", leasing, shutdown.clone());
        consume = consume.with_ownership(ownership)?;
    }
    info!(topic, group = %cli.consumer.group.group_id, "consuming");
    let stats = consume.run(shutdown).await?;
    println!(
        "wrote {} rows ({} duplicates skipped, {} dead-lettered)",
        stats.written, stats.duplicates, stats.dead_lettered
    );
    Ok(())
}
