//! The WAL source draining a backlog: events written with `Outbox::emit`
//! into a slot that existed before them, published by one relay streaming
//! the slot. Measured beside the outbox-table relay of the same run.

use std::time::Instant;

use anyhow::bail;
use outbox_core::Event;
use outbox_pg::wal::create_slot;
use outbox_pg::Outbox;
use test_support::Process;

use crate::cpu::{per_1k, postgres_seconds};
use crate::hops::{drop_pg_tables, outbox_config, topic_end};
use crate::pipeline::{
    drop_slot, start, wal_config, wal_relay_args, watermark_reader, BacklogRun, PROGRESS_EVERY,
    STOP_GRACE,
};
use crate::steady::Progress;
use crate::{key, payload, say, Env};

/// A WAL drain, and what PostgreSQL spent on it.
pub struct WalRun {
    pub run: BacklogRun,
    /// Seconds of PostgreSQL CPU (every backend: the WAL sender decoding,
    /// the relay's few queries) per 1,000 events while the relay drained.
    pub pg_cpu_s_per_1k: f64,
}

/// Emits `n` events (1,000 per transaction) after creating their slot,
/// then times one relay streaming them into Kafka until the topic holds
/// them all.
pub async fn wal_backlog(env: &Env, n: usize) -> anyhow::Result<WalRun> {
    let name = env.name("wal");
    let topic = name.clone();
    outbox_kafka::ensure_topics(&env.kafka, &[topic.as_str()]).await?;
    let config = outbox_config(&name)?;
    let mut client = env.pool.get().await?;
    outbox_pg::migrate(&client, &config).await?;
    create_slot(&client, &wal_config(&name)).await?;
    let outbox = Outbox::new(&config).with_message_prefix(name.clone());
    let filled = Instant::now();
    for first in (0..n).step_by(1000) {
        let events: Vec<Event> = (first..(first + 1000).min(n))
            .map(|i| Event::new(topic.clone(), payload(i)).with_key(key(i)))
            .collect();
        let tx = client.transaction().await?;
        outbox.emit(&tx, &events).await?;
        tx.commit().await?;
    }
    say(format!(
        "  emitted {n} events into the WAL (slot {name}) in {:.1} s",
        filled.elapsed().as_secs_f64()
    ));
    drop(client);
    say(format!(
        "relay (WAL): streaming {n} events from slot {name}"
    ));
    let pg_before = postgres_seconds();
    let started = Instant::now();
    let args = wal_relay_args(env, &name);
    let mut relay: Process = start(
        env,
        "relay-wal",
        "producer_pg_to_kafka",
        &args,
        &env.log_dir.join(format!("{name}.log")),
    )?;
    let reader = watermark_reader(env)?;
    let mut progress = Progress::default();
    let limit = std::time::Duration::from_secs(120 + (n / 2000) as u64);
    let mut published = 0;
    let elapsed = loop {
        if started.elapsed() > limit {
            bail!("the WAL relay published {published} of {n} events within {limit:?}");
        }
        if !relay.running() {
            bail!("the WAL relay exited early; see {}", env.log_dir.display());
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
        if let Ok(end) =
            tokio::task::block_in_place(|| topic_end(&reader, &topic, env.kafka.topic_partitions))
        {
            published = u64::try_from(end).unwrap_or(0);
            progress.record(started.elapsed().as_secs_f64(), published);
            if published >= n as u64 {
                break started.elapsed();
            }
        }
    };
    let pg_cpu_s_per_1k = per_1k(postgres_seconds() - pg_before, n);
    relay.stop(STOP_GRACE).await?;
    let cpu_s_per_1k = per_1k(relay.cpu_seconds(), n);
    let run = BacklogRun::new(
        name.clone(),
        topic,
        n,
        elapsed,
        &progress,
        relay.peak_rss_mb(),
        cpu_s_per_1k,
    );
    say(format!(
        "relay (WAL): {n} events in {:.2} s, the first after {:.2} s; steady {:.0} events/s, \
         relay CPU {cpu_s_per_1k:.3} s and PostgreSQL CPU {pg_cpu_s_per_1k:.3} s per 1,000 events",
        elapsed.as_secs_f64(),
        run.startup_s,
        run.rate,
    ));
    // The slot would pin the server's WAL: dropped whatever `--keep` says.
    drop_slot(env, &name).await;
    drop_pg_tables(env, &[&name, &format!("{name}_dead")]).await;
    Ok(WalRun {
        run,
        pg_cpu_s_per_1k,
    })
}
