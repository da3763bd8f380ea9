//! The relay: publishes pending events from PostgreSQL to Kafka.
//!
//! Default: the original demo, rows of `user_logins` with
//! `sent_to_kafka = false` → topic `user_events`. With `--source outbox`, the
//! events services enqueued in the outbox table. With `--source wal`, the
//! write-ahead log: the changes of the captured tables (by default the
//! same `user_logins` → `user_events`) and the events of `Outbox::emit`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use examples::{
    init_tracing, retry_startup, shutdown_on_signals, KafkaArgs, LogArgs, OpsArgs, PgArgs,
    RelayArgs, SourceKind,
};
use outbox_core::{metrics_catalog, Health, Relay, RelayConfig, Source, Stage};
use outbox_kafka::KafkaBus;
use outbox_pg::{BacklogProbe, FlagTableSource, PgOutboxSource};
use tokio_util::sync::CancellationToken;
use tracing::info;

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
    #[command(flatten)]
    relay: RelayArgs,
}

/// Where /metrics listens unless told otherwise.
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = examples::parse_cli();
    if let Some(code) = examples::check_config(&cli.log, &cli) {
        return code;
    }
    init_tracing(&cli.log);
    let tracing = match cli.log.otel.start("producer_pg_to_kafka") {
        Ok(tracing) => tracing,
        Err(err) => return examples::exit_with(Err(err)),
    };
    let drain = Duration::from_secs(cli.log.drain_timeout_secs);
    let result = examples::finish(run(cli).await, drain).await;
    drop(tracing);
    examples::exit_with(result)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let startup = Duration::from_secs(cli.log.startup_timeout_secs);
    let outbox_config = cli.relay.outbox_config()?;
    let flag_config = cli.relay.flag_config()?;
    let relay_config = RelayConfig {
        otel_spans: cli.log.otel.enabled(),
        ..cli.relay.relay_config()?
    };
    let shutdown = shutdown_on_signals(Duration::from_secs(cli.log.drain_timeout_secs));
    let health = Health::new([Stage::Source, Stage::Bus]);
    let source_metrics = match cli.relay.source {
        SourceKind::Wal => metrics_catalog::RELAY_WAL,
        SourceKind::FlagTable | SourceKind::Outbox => metrics_catalog::RELAY_TABLE,
    };
    let exported = [
        metrics_catalog::COMMON,
        metrics_catalog::RELAY,
        source_metrics,
    ];
    cli.ops
        .start(
            DEFAULT_METRICS_ADDR,
            health.clone(),
            ("relay", &exported),
            shutdown.clone(),
        )
        .await?;

    let pg = cli.pg.config("producer_pg_to_kafka")?;
    let (target, pool) = (pg.target(), pg.create_pool()?);
    retry_startup("postgres", startup, || {
        outbox_pg::check_connection(&pool, &target)
    })
    .await?;
    if !cli.relay.no_migrate {
        let client = outbox_pg::connection(&pool, &target).await?;
        outbox_pg::migrate(&client, &outbox_config).await?;
    }
    health.up(Stage::Source);

    let kafka = outbox_kafka::KafkaConfig {
        // A producer per batch in flight, so that none waits for another's request.
        producers: relay_config.max_in_flight_batches,
        cloudevents: cli.relay.cloudevents()?,
        ..cli.kafka.config("producer_pg_to_kafka")?
    };
    outbox_core::check_claim_outlives_publish(cli.relay.claim_timeout(), kafka.message_timeout)?;
    let bus = KafkaBus::new(kafka.clone())?;
    retry_startup("kafka", startup, || bus.check_connection()).await?;
    health.up(Stage::Bus);

    match cli.relay.source {
        SourceKind::FlagTable => {
            let topics = [flag_config.topic.as_str()];
            retry_startup("kafka", startup, || {
                outbox_kafka::ensure_topics(&kafka, &topics)
            })
            .await?;
            info!(table = %flag_config.table, topic = %flag_config.topic, "relaying flag table");
            let backlog = BacklogProbe::flag_table(&flag_config).report_every(
                pool.clone(),
                target.clone(),
                cli.relay.backlog_interval(),
                shutdown.clone(),
            );
            examples::spawn_background(backlog);
            if cli.relay.flag_notify_trigger {
                let client = pool.get().await.map_err(|e| {
                    anyhow::anyhow!("postgres at {target}: no connection to install the flag table's trigger: {e}")
                })?;
                outbox_pg::install_flag_notify(&client, &flag_config)
                    .await
                    .with_context(|| {
                        format!(
                            "installing the notify trigger on {} (needs its owner; or run outbox_pg::flag_notify_sql once as the owner and drop --flag-notify-trigger)",
                            flag_config.table
                        )
                    })?;
            }
            let source = FlagTableSource::new(pool, target, flag_config).listen_for_events(pg);
            run_relay(source, bus, relay_config, health, shutdown).await
        }
        SourceKind::Outbox => {
            info!(table = %outbox_config.table, "relaying outbox table");
            let backlog = BacklogProbe::outbox(&outbox_config).report_every(
                pool.clone(),
                target.clone(),
                cli.relay.backlog_interval(),
                shutdown.clone(),
            );
            examples::spawn_background(backlog);
            let source = PgOutboxSource::new(pool, target, outbox_config).listen_for_events(pg);
            run_relay(source, bus, relay_config, health, shutdown).await
        }
        SourceKind::Wal => {
            let wal = cli.relay.wal_config()?;
            let topics: Vec<String> = wal.tables.iter().filter_map(|t| t.topic.clone()).collect();
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            retry_startup("kafka", startup, || {
                outbox_kafka::ensure_topics(&kafka, &topics)
            })
            .await?;
            info!(slot = %wal.slot, publication = %wal.publication, tables = wal.tables.len(), "relaying the write-ahead log");
            let source = outbox_pg::wal::WalSource::start(
                &pg,
                pool,
                wal,
                &outbox_config.dead_letter_table().plain(),
            )?;
            if examples::progress::shown() {
                examples::spawn_background(show_load(source.load_progress(), shutdown.clone()));
            }
            run_relay(source, bus, relay_config, health, shutdown).await
        }
    }
}

/// A bar of the WAL source's initial load, on a terminal, while it runs.
async fn show_load(
    mut progress: tokio::sync::watch::Receiver<outbox_pg::wal::LoadProgress>,
    shutdown: CancellationToken,
) {
    let mut bar = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = progress.changed() => if changed.is_err() { break },
        }
        let now = *progress.borrow_and_update();
        let bar = bar.get_or_insert_with(|| examples::progress::bar(now.estimated, "initial load"));
        bar.set_length(now.estimated.max(now.rows));
        bar.set_position(now.rows);
        if now.done {
            bar.finish_and_clear();
            break;
        }
    }
}

async fn run_relay<S: Source>(
    source: S,
    bus: KafkaBus,
    config: RelayConfig,
    health: Health,
    shutdown: CancellationToken,
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
