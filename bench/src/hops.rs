//! The raw limit of each hop, with nothing of ours in the way, and the
//! original demo's relay design as the baseline.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures::stream::{FuturesUnordered, StreamExt};
use outbox_core::{Event, HEADER_CREATED_AT_MS, HEADER_EVENT_ID};
use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox_kafka::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use outbox_kafka::rdkafka::message::{Header, OwnedHeaders};
use outbox_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use outbox_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use outbox_pg::{migrate, Outbox, OutboxConfig, ValidOutboxConfig};
use sink_clickhouse::{ClickHouseConfig, ClickHouseSink, RawEventMapper, RawEventRow};
use uuid::Uuid;

use crate::{key, payload, say, Env};

/// `count` items in `elapsed`.
pub struct Measured {
    pub count: usize,
    pub elapsed: Duration,
}

impl Measured {
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn report(self, what: &str, unit: &str) -> Self {
        say(format!(
            "{what}: {} in {:.2} s = {:.0} {unit}/s",
            self.count,
            self.elapsed.as_secs_f64(),
            self.rate()
        ));
        self
    }
}

/// The relay's producer settings (idempotent, acks=all, its linger,
/// compression, partitioner and `--kafka-properties`), with a longer
/// message timeout: a raw limit must not drop messages the broker is slow
/// to take.
pub(crate) fn producer(env: &Env) -> anyhow::Result<FutureProducer> {
    Ok(env
        .kafka
        .producer_config()
        .set("message.timeout.ms", "60000")
        .create()?)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The rdkafka producer alone: `n` keyed 200-byte messages with the relay's
/// two headers, as fast as the broker acknowledges them.
pub async fn raw_produce(env: &Env, n: usize) -> anyhow::Result<Measured> {
    let topic = env.name("raw");
    outbox_kafka::ensure_topics(&env.kafka, &[topic.as_str()]).await?;
    let producer = producer(env)?;
    say(format!("raw produce: {n} messages to {topic}"));
    let mut in_flight = FuturesUnordered::new();
    let mut failed = 0usize;
    let mut note = |result: Result<Result<_, (KafkaError, _)>, _>| {
        if !matches!(result, Ok(Ok(_))) {
            failed += 1;
        }
    };
    let started = Instant::now();
    for i in 0..n {
        let key = key(i);
        let payload = payload(i);
        let id = Uuid::now_v7().to_string();
        let created = now_ms().to_string();
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: HEADER_EVENT_ID,
                value: Some(&id),
            })
            .insert(Header {
                key: HEADER_CREATED_AT_MS,
                value: Some(&created),
            });
        let mut record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    in_flight.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    if let Some(result) = in_flight.next().await {
                        note(result);
                    }
                }
                Err((err, _)) => bail!("raw produce failed: {err}"),
            }
        }
    }
    while let Some(result) = in_flight.next().await {
        note(result);
    }
    let elapsed = started.elapsed();
    if failed > 0 {
        bail!("raw produce: {failed} of {n} messages were not acknowledged");
    }
    Ok(Measured { count: n, elapsed }.report("raw produce", "msg"))
}

/// The broker hop alone at a steady rate: the rdkafka producer (the relay's
/// settings) sends `rate` messages per second, in the writer's 10 ms ticks,
/// and the same tap that times our pipeline notes when each becomes
/// readable. Returns send → readable in ms, sorted: what the broker, the
/// producer's linger and a consumer's fetch cost with nothing of ours in the
/// way, for the end-to-end figures to be read against.
pub async fn raw_latency(env: &Env, rate: u32, length: Duration) -> anyhow::Result<Vec<f64>> {
    let topic = env.name(&format!("rawlat{rate}"));
    outbox_kafka::ensure_topics(&env.kafka, &[topic.as_str()]).await?;
    let producer = producer(env)?;
    warm_up(&producer, &topic).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tap = crate::latency::tap_topic(&env.kafka.brokers, &topic, stop.clone())?;
    // The tap starts at the end of each partition: let it get there first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    say(format!(
        "raw latency at {rate} messages/s for {length:?} (send → readable)"
    ));
    let sent_at = send_paced(&producer, &topic, rate, length).await?;
    // Let the tap read the last messages.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let readable_at = tap
        .join()
        .map_err(|_| anyhow::anyhow!("the topic tap thread panicked"))?
        .seen;
    let ms = crate::latency::delays_ms(&sent_at, &readable_at);
    if ms.len() < sent_at.len() {
        bail!(
            "raw latency: the tap read {} of {} messages back",
            ms.len(),
            sent_at.len()
        );
    }
    say(format!(
        "raw latency at {rate} messages/s: {} messages, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        crate::latency::quantile(&ms, 0.5),
        crate::latency::quantile(&ms, 0.99),
        crate::latency::quantile(&ms, 1.0),
    ));
    Ok(ms)
}

/// Sends one message with an event id and waits for its acknowledgement:
/// the connection and the topic's metadata are then ready, so start-up is
/// not timed.
pub(crate) async fn warm_up(producer: &FutureProducer, topic: &str) -> anyhow::Result<()> {
    let id = Uuid::now_v7().to_string();
    let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
        key: HEADER_EVENT_ID,
        value: Some(&id),
    });
    let record = FutureRecord::to(topic)
        .key("warm")
        .payload("warm")
        .headers(headers);
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(err, _)| anyhow::anyhow!("warming up a producer on {topic}: {err}"))?;
    Ok(())
}

/// Sends `rate` keyed messages a second for `length` into `topic`, each
/// with a new event id, and waits for every acknowledgement: when each id
/// was handed to the producer.
pub(crate) async fn send_paced(
    producer: &FutureProducer,
    topic: &str,
    rate: u32,
    length: Duration,
) -> anyhow::Result<std::collections::HashMap<Uuid, Instant>> {
    let mut sent_at = std::collections::HashMap::new();
    let mut deliveries = Vec::new();
    let mut pace = crate::latency::Pace::new(rate, length);
    let mut sent = 0usize;
    while let Some(due) = pace.next().await {
        for i in sent..due {
            let id = Uuid::now_v7();
            let id_text = id.to_string();
            let key = key(i);
            let payload = payload(i);
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: HEADER_EVENT_ID,
                value: Some(&id_text),
            });
            let record = FutureRecord::to(topic)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((err, _)) => bail!("paced send to {topic}: {err}"),
            }
            sent_at.insert(id, Instant::now());
        }
        sent = due.max(sent);
    }
    let mut failed = 0usize;
    for delivery in deliveries {
        if !matches!(delivery.await, Ok(Ok(_))) {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("paced send to {topic}: {failed} of {sent} messages were not acknowledged");
    }
    Ok(sent_at)
}

/// A plain rdkafka consumer reading `topic` back from the start of every
/// partition until it has `n` messages.
pub async fn raw_consume(env: &Env, topic: &str, n: usize) -> anyhow::Result<Measured> {
    say(format!("raw consume: {n} messages from {topic}"));
    let brokers = env.kafka.brokers.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("{topic}_raw"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .set("log_level", "3")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(30))?;
        let mut list = TopicPartitionList::new();
        for partition in metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        {
            list.add_partition_offset(&topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&list)?;
        // Timed from the first message, as the binaries' drains are.
        let mut first = None;
        let mut count = 0usize;
        let deadline = Instant::now() + Duration::from_secs(600);
        while count < n {
            if Instant::now() > deadline {
                bail!("raw consume read only {count} of {n} messages in 10 minutes");
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(_)) => {
                    first.get_or_insert_with(Instant::now);
                    count += 1;
                }
                Some(Err(err)) => bail!("raw consume failed: {err}"),
                None => {}
            }
        }
        Ok(Measured {
            count: count.saturating_sub(1),
            elapsed: first.map_or(Duration::ZERO, |at| at.elapsed()),
        }
        .report("raw consume", "msg"))
    })
    .await?
}

/// A sink that created the raw table `table` (and its dead-letter table).
async fn raw_sink(env: &Env, table: &str) -> anyhow::Result<ClickHouseSink<RawEventMapper>> {
    let config = ClickHouseConfig {
        table: table.to_string(),
        dead_letter_table: format!("{table}_dead"),
        ..(*env.ch).clone()
    }
    .validate()?;
    Ok(ClickHouseSink::new(config, RawEventMapper).await?)
}

/// Row `i` of the consumer's raw table, at a given position.
fn raw_row(table: &str, i: usize, partition: i32, offset: i64) -> RawEventRow {
    RawEventRow {
        topic: table.to_string(),
        key: key(i),
        payload: String::from_utf8_lossy(&payload(i)).into_owned(),
        headers: "{}".into(),
        created_at: (now_ms() / 1000) as u32,
        event_id: Uuid::now_v7(),
        kafka_partition: partition,
        kafka_offset: offset,
        ingested_at: (now_ms() / 1000) as u32,
    }
}

/// The ClickHouse client alone: `n` rows of the consumer's raw table, in
/// 50 000-row RowBinary inserts.
pub async fn raw_insert(env: &Env, n: usize) -> anyhow::Result<Measured> {
    let table = env.name("raw_insert");
    let sink = raw_sink(env, &table).await?;
    let rows: Vec<RawEventRow> = (0..n)
        .map(|i| raw_row(&table, i, (i % 4) as i32, (i / 4) as i64))
        .collect();
    say(format!("raw insert: {n} rows into ClickHouse {table}"));
    let client = sink.client();
    let started = Instant::now();
    for chunk in rows.chunks(50_000) {
        let mut insert = client.insert::<RawEventRow>(&table).await?;
        for row in chunk {
            insert.write(row).await?;
        }
        insert.end().await?;
    }
    let elapsed = started.elapsed();
    drop_ch_tables(env, &table).await;
    Ok(Measured { count: n, elapsed }.report("raw insert", "row"))
}

/// ClickHouse alone at the consumer's pace at 1,000 events/s: an insert of
/// `rows` rows every `every`, for `length`, each timed from its start until
/// ClickHouse accepted it. Returns the insert times in ms, sorted: the fixed
/// cost every end-to-end event pays once.
pub async fn raw_small_inserts(
    env: &Env,
    rows: usize,
    every: Duration,
    length: Duration,
) -> anyhow::Result<Vec<f64>> {
    let table = env.name("raw_small_insert");
    let sink = raw_sink(env, &table).await?;
    say(format!(
        "raw small inserts: {rows} rows every {every:?} for {length:?} into {table}"
    ));
    let times = timed_inserts(sink.client().clone(), table.clone(), rows, every, length).await?;
    drop_ch_tables(env, &table).await;
    say(format!(
        "raw small inserts: {} inserts, p50 {:.1} ms, p99 {:.1} ms",
        times.len(),
        crate::latency::quantile(&times, 0.5),
        crate::latency::quantile(&times, 0.99)
    ));
    Ok(times)
}

/// An insert of `rows` rows of the raw table `table` (created by
/// [`insert_probe_table`]) every `every`, for `length`, each timed from its
/// start until ClickHouse accepted it. Returns the times in ms, sorted.
pub(crate) async fn timed_inserts(
    client: clickhouse::Client,
    table: String,
    rows: usize,
    every: Duration,
    length: Duration,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(every);
    let mut offset = 0i64;
    while started.elapsed() < length {
        tick.tick().await;
        let batch: Vec<RawEventRow> = (0..rows)
            .map(|i| {
                offset += 1;
                raw_row(&table, i, 0, offset)
            })
            .collect();
        let at = Instant::now();
        let mut insert = client.insert::<RawEventRow>(&table).await?;
        for row in &batch {
            insert.write(row).await?;
        }
        insert.end().await?;
        times.push(at.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Creates the raw table `table` for [`timed_inserts`] and returns a
/// client for it.
pub(crate) async fn insert_probe_table(
    env: &Env,
    table: &str,
) -> anyhow::Result<clickhouse::Client> {
    Ok(raw_sink(env, table).await?.client().clone())
}

/// The outbox settings of a benchmark table.
pub fn outbox_config(table: &str) -> anyhow::Result<ValidOutboxConfig> {
    Ok(OutboxConfig {
        table: table.to_string(),
        dead_letter_table: format!("{table}_dead"),
        ..OutboxConfig::default()
    }
    .validate()?)
}

/// Creates the outbox table `config` names and enqueues `n` events for
/// `topic` through [`Outbox::enqueue`], 1000 per transaction.
pub async fn fill_outbox(
    env: &Env,
    config: &ValidOutboxConfig,
    topic: &str,
    n: usize,
) -> anyhow::Result<()> {
    let mut client = env.pool.get().await?;
    migrate(&client, config).await?;
    let outbox = Outbox::new(config);
    let started = Instant::now();
    let mut next_report = n / 5;
    for start in (0..n).step_by(1000) {
        let events: Vec<Event> = (start..(start + 1000).min(n))
            .map(|i| Event::new(topic, payload(i)).with_key(key(i)))
            .collect();
        let tx = client.transaction().await?;
        outbox.enqueue(&tx, &events).await?;
        tx.commit().await?;
        if start >= next_report && n >= 100_000 {
            say(format!("  enqueued {start} of {n}"));
            next_report += n / 5;
        }
    }
    say(format!(
        "  enqueued {n} events into {} in {:.1} s",
        config.table,
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// PostgreSQL alone: claim 1000 rows with `FOR UPDATE SKIP LOCKED`, delete
/// them, commit; one worker, until the table is empty.
pub async fn raw_claim(env: &Env, n: usize) -> anyhow::Result<Measured> {
    let table = env.name("raw_claim");
    let config = outbox_config(&table)?;
    fill_outbox(env, &config, &table, n).await?;
    let mut client = env.pool.get().await?;
    // Settled table, as a relay would find a backlog.
    client
        .batch_execute(&format!("VACUUM ANALYZE {table}"))
        .await?;
    let select = client
        .prepare(&format!(
            "SELECT seq, event_id, topic, key, payload, headers, created_at FROM {table} \
             ORDER BY seq LIMIT 1000 FOR UPDATE SKIP LOCKED"
        ))
        .await?;
    let delete = client
        .prepare(&format!("DELETE FROM {table} WHERE seq = ANY($1)"))
        .await?;
    say(format!("raw claim: {n} rows from PostgreSQL {table}"));
    let started = Instant::now();
    let mut count = 0usize;
    loop {
        let tx = client.transaction().await?;
        let rows = tx.query(&select, &[]).await?;
        if rows.is_empty() {
            break;
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        tx.execute(&delete, &[&ids]).await?;
        tx.commit().await?;
        count += rows.len();
    }
    let elapsed = started.elapsed();
    drop_pg_tables(env, &[&table, &format!("{table}_dead")]).await;
    Ok(Measured { count, elapsed }.report("raw claim", "row"))
}

/// The original demo's relay: select the unsent rows, send each one, wait
/// for its delivery (flush), update its flag; row by row.
pub async fn naive_relay(env: &Env, n: usize) -> anyhow::Result<Measured> {
    let table = env.name("naive");
    let topic = table.clone();
    outbox_kafka::ensure_topics(&env.kafka, &[topic.as_str()]).await?;
    let client = env.pool.get().await?;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, username text NOT NULL, \
               event_type text NOT NULL, event_time timestamptz NOT NULL DEFAULT now(), \
               sent_to_kafka boolean NOT NULL DEFAULT false); \
             INSERT INTO {table} (username, event_type) \
               SELECT 'user' || (g % 1000), 'login' FROM generate_series(1, {n}) AS g"
        ))
        .await?;
    let producer = producer(env)?;
    say(format!(
        "original design: {n} rows of {table}, one at a time"
    ));
    let started = Instant::now();
    let mut count = 0usize;
    loop {
        let rows = client
            .query(
                &format!(
                    "SELECT id, username FROM {table} WHERE sent_to_kafka = false ORDER BY id"
                ),
                &[],
            )
            .await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let id: i64 = row.get(0);
            let username: String = row.get(1);
            let payload = payload(id as usize);
            producer
                .send(
                    FutureRecord::to(&topic).key(&username).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(err, _)| anyhow::anyhow!("original design: send failed: {err}"))?;
            client
                .execute(
                    &format!("UPDATE {table} SET sent_to_kafka = true WHERE id = $1"),
                    &[&id],
                )
                .await?;
            count += 1;
        }
    }
    let elapsed = started.elapsed();
    drop_pg_tables(env, &[&table]).await;
    Ok(Measured { count, elapsed }.report("original design", "event"))
}

/// Drops PostgreSQL tables of the run (unless `--keep`).
pub async fn drop_pg_tables(env: &Env, tables: &[&str]) {
    if env.keep {
        return;
    }
    if let Ok(client) = env.pool.get().await {
        for table in tables {
            let _ = client
                .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
                .await;
        }
    }
}

/// Drops a ClickHouse table of the run and its dead-letter table (unless `--keep`).
pub async fn drop_ch_tables(env: &Env, table: &str) {
    if env.keep {
        return;
    }
    let Ok(client) = sink_clickhouse::client_for(&env.ch) else {
        return;
    };
    for t in [table.to_string(), format!("{table}_dead")] {
        let _ = client
            .query(&format!("DROP TABLE IF EXISTS `{t}`"))
            .execute()
            .await;
    }
}

/// Sum of the high watermarks of `topic`: messages in it so far.
pub fn topic_end(consumer: &BaseConsumer, topic: &str, partitions: i32) -> anyhow::Result<i64> {
    let mut total = 0;
    for partition in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .with_context(|| format!("watermarks of {topic}/{partition}"))?;
        total += high;
    }
    Ok(total)
}
