//! Integration tests of sink-clickhouse against a real ClickHouse.
//!
//! Needs the server of `scripts/stack.sh up`; override its address with
//! `OUTBOX_CLICKHOUSE_URL`. Each test writes its own tables, named after it.

use std::collections::BTreeMap;

use bytes::Bytes;
use outbox_core::{Position, Record, Sink, HEADER_EVENT_ID};
use sink_clickhouse::{ClickHouseConfig, ClickHouseSink, RawEventMapper};
use uuid::Uuid;

mod table_rows;

fn config(name: &str) -> ClickHouseConfig {
    ClickHouseConfig {
        table: format!("it_{name}"),
        dead_letter_table: format!("it_{name}_dead"),
        ..test_support::clickhouse()
    }
}

/// Drops the data and dead-letter tables of `config`; gives its client.
async fn drop_tables(config: &ClickHouseConfig) -> clickhouse::Client {
    let client = sink_clickhouse::client_for(config).unwrap();
    for table in [&config.table, &config.dead_letter_table] {
        client
            .query(&format!("DROP TABLE IF EXISTS `{table}`"))
            .execute()
            .await
            .unwrap();
    }
    client
}

async fn fresh_sink(name: &str) -> ClickHouseSink<RawEventMapper> {
    let config = config(name);
    drop_tables(&config).await;
    ClickHouseSink::new(config.validate().unwrap(), RawEventMapper)
        .await
        .unwrap()
}

/// A sink with the same config but no memory of what it wrote: a restarted consumer.
async fn restarted_sink(name: &str) -> ClickHouseSink<RawEventMapper> {
    ClickHouseSink::new(config(name).validate().unwrap(), RawEventMapper)
        .await
        .unwrap()
}

fn record(partition: i32, offset: i64, id: Uuid) -> Record {
    let mut headers = BTreeMap::new();
    headers.insert(HEADER_EVENT_ID.to_string(), id.to_string());
    Record {
        topic: "events".into(),
        position: Position { partition, offset },
        key: Some(Bytes::from(format!("k{partition}"))),
        payload: Some(Bytes::from(format!("{{\"n\":{offset}}}"))),
        headers,
        timestamp_ms: Some(1_700_000_000_000),
    }
}

fn batch(partition: i32, offsets: std::ops::Range<i64>) -> Vec<Record> {
    offsets
        .map(|o| record(partition, o, Uuid::now_v7()))
        .collect()
}

/// (rows, distinct event ids) without FINAL.
async fn counts(sink: &ClickHouseSink<RawEventMapper>, table: &str) -> (u64, u64) {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Counts {
        rows: u64,
        distinct: u64,
    }
    let c = sink
        .client()
        .query(&format!(
            "SELECT count() AS rows, uniqExact(event_id) AS distinct FROM `{table}`"
        ))
        .fetch_one::<Counts>()
        .await
        .unwrap();
    (c.rows, c.distinct)
}

/// Invariant (no duplicate): a batch written, then delivered again to a
/// restarted consumer (killed between insert and Kafka commit), is not
/// written twice. Mechanism checked: positions stored with the rows.
#[tokio::test]
async fn redelivered_batch_after_restart_is_not_written_twice() {
    let mut sink = fresh_sink("redelivery").await;
    let records = [batch(0, 0..500), batch(1, 0..300)].concat();
    let first = sink.write(&records).await.unwrap();
    assert_eq!(first.written, 800);

    let mut restarted = restarted_sink("redelivery").await;
    let again = restarted.write(&records).await.unwrap();
    let (rows, distinct) = counts(&restarted, "it_redelivery").await;
    println!(
        "first_written={} redelivered_written={} duplicates_skipped={} rows={rows} distinct={distinct}",
        first.written, again.written, again.duplicates
    );
    assert_eq!(again.written, 0);
    assert_eq!(again.duplicates, 800);
    assert_eq!((rows, distinct), (800, 800));
}

/// Invariant (no loss, no duplicate): when only part of a batch reached the
/// table (an insert cut short by a crash, in any order), the redelivered
/// batch writes exactly the missing records.
#[tokio::test]
async fn partly_written_batch_is_completed_exactly() {
    let mut sink = fresh_sink("partial").await;
    let records = batch(0, 0..100);
    // A prefix, and scattered rows beyond it, as a broken insert may leave.
    let scattered: Vec<Record> = records
        .iter()
        .filter(|r| r.position.offset < 40 || r.position.offset % 7 == 0)
        .cloned()
        .collect();
    let partial = sink.write(&scattered).await.unwrap();

    let mut restarted = restarted_sink("partial").await;
    let completed = restarted.write(&records).await.unwrap();
    let (rows, distinct) = counts(&restarted, "it_partial").await;
    println!(
        "partial_written={} completed_written={} skipped={} rows={rows} distinct={distinct}",
        partial.written, completed.written, completed.duplicates
    );
    assert_eq!(partial.written + completed.written, 100);
    assert_eq!(completed.duplicates, partial.written);
    assert_eq!((rows, distinct), (100, 100));
}

/// Continuing batches need no lookup, and a jump back (rebalance) is
/// recognised even without a restart.
#[tokio::test]
async fn replay_within_one_sink_is_recognised() {
    let mut sink = fresh_sink("replay").await;
    sink.write(&batch(2, 0..50)).await.unwrap();
    let next = batch(2, 50..80);
    sink.write(&next).await.unwrap();
    let replay = sink.write(&next).await.unwrap();
    assert_eq!((replay.written, replay.duplicates), (0, 30));
    assert_eq!(counts(&sink, "it_replay").await, (80, 80));
}

/// Invariant (poison isolated): a record without an event id goes to the
/// dead-letter table with its reason; the rest of the batch is written, and
/// the dead letter is not written again on redelivery.
#[tokio::test]
async fn poison_record_is_dead_lettered_and_the_rest_flows() {
    let mut sink = fresh_sink("poison").await;
    let mut records = batch(0, 0..10);
    records[4].headers.clear();
    let report = sink.write(&records).await.unwrap();
    assert_eq!(report.written, 9);
    assert_eq!(report.dead_lettered.len(), 1);
    assert_eq!(report.dead_lettered[0].0.offset, 4);
    assert!(report.dead_lettered[0].1.contains("outbox-event-id"));

    let mut restarted = restarted_sink("poison").await;
    let again = restarted.write(&records).await.unwrap();
    assert_eq!(
        (again.written, again.duplicates, again.dead_lettered.len()),
        (0, 10, 0)
    );

    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Dead {
        kafka_offset: i64,
        reason: String,
    }
    let dead = restarted
        .client()
        .query("SELECT kafka_offset, reason FROM it_poison_dead")
        .fetch_all::<Dead>()
        .await
        .unwrap();
    println!(
        "written=9 dead_lettered={} reason={:?}",
        dead.len(),
        dead[0].reason
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].kafka_offset, 4);
    assert_eq!(counts(&restarted, "it_poison").await, (9, 9));
}

#[tokio::test]
async fn wrong_password_and_bad_names_are_clear_permanent_errors() {
    let bad = ClickHouseConfig {
        password: "not-the-password".into(),
        ..config("auth")
    };
    let err = ClickHouseSink::new(bad.validate().unwrap(), RawEventMapper)
        .await
        .err()
        .unwrap();
    let text = err.to_string();
    println!("{text}");
    assert!(!err.is_retryable(), "{text}");
    assert!(
        text.contains("clickhouse at http://127.0.0.1:8123"),
        "{text}"
    );
    assert!(text.contains("user and password"), "{text}");
    assert!(
        !text.contains("not-the-password"),
        "password leaked: {text}"
    );

    let hostile = ClickHouseConfig {
        table: "t; DROP TABLE x".into(),
        ..config("names")
    };
    let err = hostile.validate().err().unwrap();
    assert!(
        err.to_string().contains("invalid clickhouse table"),
        "{err}"
    );

    let down = ClickHouseConfig {
        url: "http://127.0.0.1:1".into(),
        ..config("down")
    };
    let err = ClickHouseSink::new(down.validate().unwrap(), RawEventMapper)
        .await
        .err()
        .unwrap();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("is ClickHouse running"), "{err}");
}

/// Invariant (no duplicate when the relay published an event twice): a
/// second copy of an event at a new offset of the same partition is
/// skipped, also by a restarted sink (ids loaded from the table), also
/// within one batch. Mechanism checked: the per-partition window of recent
/// event ids.
#[tokio::test]
async fn second_copy_at_a_new_offset_is_skipped() {
    let mut sink = fresh_sink("copies").await;
    let originals = batch(0, 0..100);
    sink.write(&originals).await.unwrap();

    // The relay died after the broker's ack: events 50..70 published again,
    // after which new events follow.
    let mut next: Vec<Record> = (0..20)
        .map(|i| record(0, 100 + i, originals[50 + i as usize].event_id().unwrap()))
        .collect();
    next.extend(batch(0, 120..150));
    let report = sink.write(&next).await.unwrap();
    assert_eq!((report.written, report.duplicates), (30, 20));

    // A restarted sink still recognises copies of events written before it started,
    // and a copy inside the same batch.
    let mut restarted = restarted_sink("copies").await;
    let mut late: Vec<Record> = (0..10)
        .map(|i| record(0, 150 + i, originals[i as usize].event_id().unwrap()))
        .collect();
    let fresh = Uuid::now_v7();
    late.push(record(0, 160, fresh));
    late.push(record(0, 161, fresh));
    let report = restarted.write(&late).await.unwrap();
    let (rows, distinct) = counts(&restarted, "it_copies").await;
    println!(
        "originals=100 copies_after_relay_crash=20 late_copies=10 in_batch_copy=1 written={} skipped={} rows={rows} distinct={distinct}",
        report.written, report.duplicates
    );
    assert_eq!((report.written, report.duplicates), (1, 11));
    assert_eq!((rows, distinct), (131, 131));
}

fn tls_file(name: &str) -> std::path::PathBuf {
    test_support::tls_file(name)
}

fn https_config(name: &str, host: &str, ca: Option<&str>) -> ClickHouseConfig {
    let port = std::env::var("OUTBOX_CLICKHOUSE_HTTPS_PORT").unwrap_or_else(|_| "8443".into());
    ClickHouseConfig {
        url: format!("https://{host}:{port}"),
        ca_file: ca.map(tls_file),
        ..config(name)
    }
}

/// HTTPS: the sink writes and reads back over TLS when it trusts the CA that
/// signed the server's certificate and the URL names the certificate's
/// host; otherwise it refuses with a permanent error that says what to
/// check. (The stack's ClickHouse serves HTTPS on 8443 with a certificate
/// for `localhost` from the stack's own CA.)
#[tokio::test]
async fn https_with_a_private_ca_writes_and_refuses_untrusted_servers() {
    let good = https_config("https", "localhost", Some("ca.crt"));
    let client = sink_clickhouse::client_for(&good).unwrap();
    for table in [&good.table, &good.dead_letter_table] {
        client
            .query(&format!("DROP TABLE IF EXISTS `{table}`"))
            .execute()
            .await
            .unwrap();
    }
    let mut sink = ClickHouseSink::new(good.clone().validate().unwrap(), RawEventMapper)
        .await
        .unwrap();
    let report = sink.write(&batch(0, 0..50)).await.unwrap();
    let rows: u64 = client
        .query(&format!("SELECT count() FROM `{}`", good.table))
        .fetch_one()
        .await
        .unwrap();
    println!("https: written={} rows={rows}", report.written);
    assert_eq!((report.written, rows), (50, 50));

    for (case, config) in [
        (
            "a CA that did not sign the server's certificate",
            https_config("https", "localhost", Some("other-ca.crt")),
        ),
        (
            "the system CAs only",
            https_config("https", "localhost", None),
        ),
        (
            "a host the certificate does not name",
            https_config("https", "127.0.0.1", Some("ca.crt")),
        ),
    ] {
        let err = sink_clickhouse::check_connection(&config)
            .await
            .expect_err(case);
        let text = err.to_string();
        println!("{case}: {text}");
        assert!(!err.is_retryable(), "{case}: permanent: {text}");
        assert!(text.contains("TLS settings"), "{case}: {text}");
    }

    let missing = ClickHouseConfig {
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..good
    };
    let err = sink_clickhouse::client_for(&missing).expect_err("no such file");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

/// Invariant (exactly-once on a cluster): with `cluster` set, the sink
/// creates a local table and a `Distributed` table over it, writes through
/// the Distributed table (synchronously) and finds what it wrote through it
/// after a restart: a redelivered batch adds nothing, the Distributed table
/// and the shard's local table hold each event once. The stack's ClickHouse
/// has a one-node cluster `outbox_local` (no Keeper here: no `ON CLUSTER`,
/// no replication; both are DDL text checked in the unit tests).
#[tokio::test]
async fn cluster_tables_write_through_distributed_exactly_once() {
    let cluster = sink_clickhouse::ClusterConfig {
        on_cluster: false,
        replicated: false,
        ..sink_clickhouse::ClusterConfig::new("outbox_local")
    };
    let cfg = ClickHouseConfig {
        cluster: Some(cluster),
        ..config("cluster")
    };
    let client = sink_clickhouse::client_for(&cfg).unwrap();
    for table in [
        "it_cluster",
        "it_cluster_local",
        "it_cluster_dead",
        "it_cluster_dead_local",
    ] {
        client
            .query(&format!("DROP TABLE IF EXISTS `{table}`"))
            .execute()
            .await
            .unwrap();
    }
    let batch: Vec<Record> = (0..3).flat_map(|p| batch(p, 0..40)).collect();
    let mut sink = ClickHouseSink::new(cfg.clone().validate().unwrap(), RawEventMapper)
        .await
        .unwrap();
    // The same Distributed table named without its cluster: found, and
    // written synchronously all the same.
    let unaware = ClickHouseSink::new(
        ClickHouseConfig {
            create_tables: false,
            ..config("cluster")
        }
        .validate()
        .unwrap(),
        RawEventMapper,
    )
    .await
    .unwrap();
    assert_eq!(
        unaware.write_settings(),
        vec![("insert_distributed_sync", "1".to_string())]
    );
    let first = sink.write(&batch).await.unwrap();
    drop(sink);
    let mut restarted = ClickHouseSink::new(cfg.clone().validate().unwrap(), RawEventMapper)
        .await
        .unwrap();
    let again = restarted.write(&batch).await.unwrap();
    // Not system.tables: ClickHouse 18 fails a scan of it when a parallel
    // test drops one of the tables it lists.
    let create: String = client
        .query("SHOW CREATE TABLE it_cluster")
        .fetch_one()
        .await
        .unwrap();
    let engine = create
        .split("ENGINE = ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_alphanumeric()).next())
        .unwrap_or_default()
        .to_string();
    let count = |sql: &'static str| {
        let client = client.clone();
        async move { client.query(sql).fetch_one::<u64>().await.unwrap() }
    };
    let distributed = count("SELECT count() FROM it_cluster").await;
    let distinct = count("SELECT uniqExact(event_id) FROM it_cluster").await;
    let local = count("SELECT count() FROM it_cluster_local").await;
    println!(
        "cluster: engine={engine} sent=120 written={} redelivered_written={} duplicates={} distributed_rows={distributed} distinct={distinct} local_rows={local}",
        first.written, again.written, again.duplicates
    );
    assert_eq!(engine, "Distributed");
    assert_eq!(
        (first.written, again.written, again.duplicates),
        (120, 0, 120)
    );
    assert_eq!((distributed, distinct, local), (120, 120, 120));
}

/// Invariant (no silent loss): when a topic starts over at offset 0 (deleted
/// and created again, or its broker's data lost), records at offsets that
/// the table already holds for other events are never skipped as
/// duplicates: the sink stops with a permanent error that names the
/// partition, the offset and both event ids, and writes nothing of that batch.
#[tokio::test]
async fn a_topic_that_starts_over_is_an_error_not_duplicates() {
    let mut sink = fresh_sink("regression").await;
    let old = batch(0, 0..300);
    sink.write(&old).await.unwrap();

    // A restarted consumer reads the re-created topic from its beginning:
    // new events at the old offsets.
    let reborn = batch(0, 0..200);
    let mut restarted = restarted_sink("regression").await;
    let outcome = restarted.write(&reborn).await;
    let (rows, _) = counts(&restarted, "it_regression").await;
    println!(
        "old_rows=300 new_events=200 outcome={:?} rows_after={rows}",
        outcome.as_ref().map(|r| (r.written, r.duplicates))
    );
    let err = outcome.expect_err("new events at stored offsets must not be skipped");
    let text = outbox_core::ErrorChain(&err).to_string();
    assert!(!err.is_retryable(), "{text}");
    assert!(text.contains("offset 0"), "{text}");
    assert!(text.contains(&reborn[0].headers[HEADER_EVENT_ID]), "{text}");
    assert!(text.contains(&old[0].headers[HEADER_EVENT_ID]), "{text}");
    assert_eq!(rows, 300);

    // The same sink that wrote the old events, seeing offset 0 again.
    let again = sink.write(&reborn).await;
    assert!(again.is_err_and(|e| !e.is_retryable()));
}

/// A redelivery that overlaps dead letters is still recognised by id: the
/// comparison covers the dead-letter table (empty ids included).
#[tokio::test]
async fn redelivered_dead_letters_are_duplicates_not_regressions() {
    let mut sink = fresh_sink("dead_redelivery").await;
    let mut records = batch(3, 0..10);
    records[4].headers.remove(HEADER_EVENT_ID);
    records[6]
        .headers
        .insert(HEADER_EVENT_ID.into(), "not-a-uuid".into());
    let first = sink.write(&records).await.unwrap();
    assert_eq!((first.written, first.dead_lettered.len()), (8, 2));
    let mut restarted = restarted_sink("dead_redelivery").await;
    let again = restarted.write(&records).await.unwrap();
    assert_eq!((again.written, again.duplicates), (0, 10));
}
