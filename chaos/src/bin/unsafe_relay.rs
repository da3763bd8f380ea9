//! A deliberately broken relay, for proving that the chaos harness can fail.
//!
//! It does what a naive outbox relay does: take a batch with plain
//! `FOR UPDATE SKIP LOCKED` (no lanes), **delete it and commit before
//! publishing**, then publish and forget whatever the broker refused. So:
//! - a kill between its commit and the broker's ack loses the batch;
//! - a broker outage loses every batch attempted during it;
//! - several of them at once publish a key's events out of order.
//!
//! Never use it for anything but `chaos --unsafe-relay`.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use outbox_core::{Bus, Event};
use outbox_kafka::KafkaBus;
use uuid::Uuid;

/// Publish the outbox unsafely (delete first, publish after).
#[derive(Debug, Parser)]
struct Cli {
    /// Outbox table.
    #[arg(long)]
    outbox_table: String,
    /// Most events per batch.
    #[arg(long, default_value_t = 200)]
    batch_size: i64,
    #[command(flatten)]
    pg: examples::PgArgs,
    #[command(flatten)]
    kafka: examples::KafkaArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let table = outbox_pg::SqlName::parse(&cli.outbox_table).context("--outbox-table")?;
    let pool = cli.pg.config("unsafe_relay")?.create_pool()?;
    let bus = KafkaBus::new(cli.kafka.config("unsafe_relay")?)?;
    let take = format!(
        "DELETE FROM {table} WHERE seq IN \
           (SELECT seq FROM {table} ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) \
         RETURNING seq, event_id, topic, key, payload",
    );
    loop {
        let taken = async {
            let client = pool.get().await?;
            // Autocommit: the rows are gone before anything was published.
            let rows = client.query(&take, &[&cli.batch_size]).await?;
            anyhow::Ok(rows)
        }
        .await;
        let mut rows = match taken {
            Ok(rows) => rows,
            Err(err) => {
                eprintln!("unsafe_relay: claim failed: {err:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        rows.sort_by_key(|row| row.get::<_, i64>(0));
        let events: Vec<Event> = rows
            .iter()
            .map(|row| {
                let mut event = Event::new(row.get::<_, String>(2), row.get::<_, Vec<u8>>(4))
                    .with_id(row.get::<_, Uuid>(1));
                if let Some(key) = row.get::<_, Option<Vec<u8>>>(3) {
                    event = event.with_key(key);
                }
                event
            })
            .collect();
        match bus.publish(&events).await {
            Ok(deliveries) => {
                let dropped = deliveries.iter().filter(|d| !d.is_acknowledged()).count();
                if dropped > 0 {
                    eprintln!("unsafe_relay: dropped {dropped} events the broker refused");
                }
            }
            Err(err) => eprintln!(
                "unsafe_relay: dropped a batch of {}: {}",
                events.len(),
                outbox_core::ErrorChain(&err)
            ),
        }
    }
}
