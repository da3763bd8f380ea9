//! The consumer: reads Kafka and writes ClickHouse, each event once.
//!
//! Default: the original demo, topic `user_events` → table `user_logins`.
//! A configuration file's `[[route]]` entries run several topics into
//! their tables in one process (see `examples::routes`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use examples::routes::{self, Route};
use examples::{
    init_tracing, retry_startup, shutdown_on_signals, AssignmentArg, ClickHouseArgs, ConsumerArgs,
    KafkaArgs, LogArgs, OpsArgs, PgArgs, RowFormat, UserLoginMapper,
};
use outbox_core::{metrics_catalog, Consume, Health, Stage};
use outbox_kafka::{KafkaBus, KafkaSubscription, LagProbe};
use outbox_pg::PartitionLeases;
use sink_clickhouse::{ClickHouseSink, Mapping, RawEventMapper, TableRows};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Read events from Kafka and write them to ClickHouse; Kafka positions move
/// only after ClickHouse accepted the rows, and rows already written are
/// recognised by their stored position.
#[derive(Debug, Clone, Parser)]
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
    let cli: Cli = examples::parse_cli_with_sections(&[routes::ROUTE_KEY]);
    if cli.log.check_config {
        // The routes of the file are options too.
        let routes = match &cli.log.config {
            Some(path) => routes::routes_in_file(path),
            None => Ok(Vec::new()),
        };
        let resolved = routes.and_then(|specs| {
            let clickhouse = cli.clickhouse.config()?;
            routes::resolve(&specs, &cli.consumer, &clickhouse)
        });
        return match resolved {
            Ok(routes) => {
                let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
                println!("routes: {names:?}");
                examples::check_config(&cli.log, &cli).unwrap_or(ExitCode::SUCCESS)
            }
            Err(err) => examples::exit_with(Err(err)),
        };
    }
    init_tracing(&cli.log);
    let tracing = match cli.log.otel.start("consumer_to_clickhouse") {
        Ok(tracing) => tracing,
        Err(err) => return examples::exit_with(Err(err)),
    };
    let drain = Duration::from_secs(cli.log.drain_timeout_secs);
    let result = examples::finish(run(cli).await, drain).await;
    drop(tracing);
    examples::exit_with(result)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let specs = match &cli.log.config {
        Some(path) => routes::routes_in_file(path)?,
        None => Vec::new(),
    };
    let routes = routes::resolve(&specs, &cli.consumer, &cli.clickhouse.config()?)?;
    let shutdown = shutdown_on_signals(Duration::from_secs(cli.log.drain_timeout_secs));
    // Each route reports its own stages: a route whose table refuses
    // inserts keeps /readyz at 503 however well the others write.
    let health = Health::default();
    let route_health: Vec<Health> = routes
        .iter()
        .map(|route| health.scoped(route.name.clone(), [Stage::Bus, Stage::Sink]))
        .collect();
    let exported = [metrics_catalog::COMMON, metrics_catalog::CONSUMER];
    cli.ops
        .start(
            DEFAULT_METRICS_ADDR,
            health.clone(),
            ("consume", &exported),
            shutdown.clone(),
        )
        .await?;
    // A route that fails for good stops the others: the process exits with
    // its error, and the restarted process resumes every route where it
    // was committed.
    let stop = shutdown.child_token();
    let mut running = tokio::task::JoinSet::new();
    for (route, health) in routes.into_iter().zip(route_health) {
        let (cli, stop) = (cli.clone(), stop.clone());
        running.spawn(async move {
            let name = route.name.clone();
            let result = match route.format {
                RowFormat::UserLogins => {
                    run_route(&cli, route, UserLoginMapper, health, stop.clone()).await
                }
                RowFormat::Raw => {
                    run_route(&cli, route, RawEventMapper, health, stop.clone()).await
                }
                RowFormat::Table => {
                    let rows = TableRows::new(route.rows.clone());
                    run_route(&cli, route, rows, health, stop.clone()).await
                }
            };
            if result.is_err() {
                stop.cancel();
            }
            result.with_context(|| format!("route {name}"))
        });
    }
    let mut first_error = None;
    while let Some(done) = running.join_next().await {
        let result = done.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(err) = result {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn run_route<M: Mapping>(
    cli: &Cli,
    route: Route,
    mapper: M,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let startup = Duration::from_secs(cli.log.startup_timeout_secs);
    let args = &route.consumer;
    let config = outbox_core::ConsumeConfig {
        otel_spans: cli.log.otel.enabled(),
        ..args.consume_config()?
    };
    let ch_config = route.clickhouse.clone();
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
    let topic = args.group.topic.as_str();
    let topics = [topic];
    retry_startup("kafka", startup, || {
        outbox_kafka::ensure_topics(&kafka, &topics)
    })
    .await?;
    let subscription = KafkaSubscription::new(&kafka, args.consumer_config())?;
    health.up(Stage::Bus);
    let probe = LagProbe::new(&kafka, &args.group.group_id, topic)?;
    examples::spawn_background(probe.report_every(args.lag_interval(), shutdown.clone()));

    let mut consume = Consume::new(subscription, sink, config).with_health(health);
    if args.assignment == AssignmentArg::Leased {
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
        let leases = PartitionLeases::new(pg, args.lease_config(partitions))?;
        let (ownership, leasing) = leases.start(shutdown.clone());
        examples::spawn_critical("partition leases", leasing, shutdown.clone());
        consume = consume.with_ownership(ownership)?;
    }
    info!(route = %route.name, group = %args.group.group_id, "consuming");
    let stats = consume.run(shutdown).await?;
    println!(
        "{}: wrote {} rows ({} duplicates skipped, {} dead-lettered)",
        route.name, stats.written, stats.duplicates, stats.dead_lettered
    );
    Ok(())
}
