//! An example service: writes a business row and its event in one transaction.
//!
//! Each call inserts `--count` rows into `user_logins` (already flagged as
//! sent, since their events travel through the outbox instead) and enqueues
//! one `user_events` event per row in the outbox, in the same transaction.
//! With `--rollback` the transaction is rolled back: neither the rows nor the
//! events exist afterwards, and nothing is ever published.

use std::process::ExitCode;

use clap::Parser;
use examples::{init_tracing, LogArgs, PgArgs};
use opentelemetry::trace::{FutureExt as _, SpanKind, TraceContextExt as _, Tracer as _};
use outbox_core::Event;
use outbox_pg::{Outbox, OutboxConfig};

/// Insert user_logins rows and their events atomically.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    pg: PgArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Who logged in.
    #[arg(long, default_value = "alice")]
    username: String,
    /// What happened.
    #[arg(long, default_value = "login")]
    event_type: String,
    /// How many rows (and events).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Topic of the events.
    #[arg(long, env = "OUTBOX_TOPIC", default_value = "user_events")]
    topic: String,
    /// Outbox table.
    #[arg(long, env = "OUTBOX_TABLE", default_value = "outbox")]
    outbox_table: String,
    /// Roll the transaction back instead of committing it.
    #[arg(long)]
    rollback: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = examples::parse_cli();
    if let Some(code) = examples::check_config(&cli.log, &cli) {
        return code;
    }
    init_tracing(&cli.log);
    let tracing = match cli.log.otel.start("service_enqueue") {
        Ok(tracing) => tracing,
        Err(err) => return examples::exit_with(Err(err)),
    };
    let result = run(cli).await;
    drop(tracing);
    examples::exit_with(result)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = OutboxConfig {
        table: cli.outbox_table.clone(),
        ..OutboxConfig::default()
    }
    .validate()?;
    let outbox = Outbox::new(&config);
    let pg = cli.pg.config("service_enqueue")?;
    let target = pg.target();
    let pool = pg.create_pool()?;
    let mut client = outbox_pg::connection(&pool, &target).await?;
    outbox_pg::migrate(&client, &config).await?;

    // The service's own span: the events enqueued inside it carry its
    // trace context (outbox-pg's `otel` feature), so the relay's and the
    // consumer's spans link back to it.
    let tracer = opentelemetry::global::tracer("service_enqueue");
    let span = tracer
        .span_builder("record logins")
        .with_kind(SpanKind::Server)
        .start(&tracer);
    let cx = opentelemetry::Context::current_with_span(span);
    let trace_id = cx.span().span_context().trace_id();
    let result = transaction(&cli, &outbox, &mut client)
        .with_context(cx.clone())
        .await;
    cx.span().end();
    let ids = result?;
    let done = if cli.rollback {
        "rolled back"
    } else {
        "committed"
    };
    if cx.span().span_context().is_valid() {
        println!(
            "{done} {} rows and their events: {ids:?} (trace {trace_id})",
            ids.len()
        );
    } else {
        println!("{done} {} rows and their events: {ids:?}", ids.len());
    }
    Ok(())
}

/// The business rows and their events, in one transaction.
async fn transaction(
    cli: &Cli,
    outbox: &Outbox,
    client: &mut outbox_pg::deadpool_postgres::Object,
) -> anyhow::Result<Vec<i64>> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL TIME ZONE 'UTC'").await?;
    let mut events = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..cli.count {
        // The business write. The row is flagged as sent: its event goes
        // through the outbox, not through the flag-table relay.
        let row = tx
            .query_one(
                "WITH inserted AS (INSERT INTO user_logins (username, event_type, sent_to_kafka) \
                 VALUES ($1, $2, true) RETURNING *) \
                 SELECT id, (to_jsonb(inserted) - 'sent_to_kafka')::text AS payload FROM inserted",
                &[&cli.username, &cli.event_type],
            )
            .await?;
        let id: i64 = row.try_get("id")?;
        let payload: String = row.try_get("payload")?;
        ids.push(id);
        events.push(
            Event::new(cli.topic.clone(), payload)
                .with_key(cli.username.clone())
                .with_header("content-type", "application/json"),
        );
    }
    outbox.enqueue(&tx, &events).await?;
    if cli.rollback {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(ids)
}
