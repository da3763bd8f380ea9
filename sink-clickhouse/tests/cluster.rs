//! The sink on a real replicated cluster: ZooKeeper, shard 1 on ch1 and ch2
//! (two replicas), shard 2 on ch3, started by `scripts/cluster.sh up`
//! (`make test` does it). Replicated tables created `ON CLUSTER`, inserts
//! through `Distributed` tables, replicas stopped and lagging.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use outbox_core::{Position, Record, Sink, WriteReport, HEADER_EVENT_ID};
use sink_clickhouse::{ClickHouseConfig, ClickHouseSink, ClusterConfig, RawEventMapper};
use uuid::Uuid;

/// The tests stop replicas: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Server `n` of the cluster (HTTP).
fn node(n: u8) -> String {
    format!("http://127.0.0.1:813{n}")
}

fn unique(name: &str) -> String {
    test_support::unique("cl", name)
}

fn config(url: &str, table: &str, cluster: &str, quorum: Option<u32>) -> ClickHouseConfig {
    ClickHouseConfig {
        url: url.to_string(),
        table: table.to_string(),
        dead_letter_table: format!("{table}_dead"),
        insert_timeout: Duration::from_secs(5),
        cluster: Some(ClusterConfig {
            insert_quorum: quorum,
            ..ClusterConfig::new(cluster)
        }),
        ..ClickHouseConfig::default()
    }
}

fn batch(partitions: std::ops::Range<i32>, per_partition: i64) -> Vec<Record> {
    partitions
        .flat_map(|partition| {
            (0..per_partition).map(move |offset| {
                let mut headers = BTreeMap::new();
                headers.insert(HEADER_EVENT_ID.to_string(), Uuid::now_v7().to_string());
                Record {
                    topic: "events".into(),
                    position: Position { partition, offset },
                    key: Some(Bytes::from(format!("k{partition}"))),
                    payload: Some(Bytes::from(format!("{{\"n\":{offset}}}"))),
                    headers,
                    timestamp_ms: Some(1_700_000_000_000),
                }
            })
        })
        .collect()
}

async fn run(url: &str, sql: &str) {
    let client = sink_clickhouse::client_for(&ClickHouseConfig {
        url: url.to_string(),
        ..ClickHouseConfig::default()
    })
    .unwrap();
    client.query(sql).execute().await.unwrap();
}

/// (rows, distinct event ids) of `table` read on server `url`, no FINAL.
async fn counts(url: &str, table: &str) -> (u64, u64) {
    let client = sink_clickhouse::client_for(&ClickHouseConfig {
        url: url.to_string(),
        ..ClickHouseConfig::default()
    })
    .unwrap();
    client
        .query(&format!(
            "SELECT count(), uniqExact(event_id) FROM `{table}`"
        ))
        .fetch_one::<(u64, u64)>()
        .await
        .unwrap()
}

async fn sync_replicas(table: &str) {
    for n in [1, 2] {
        run(&node(n), &format!("SYSTEM SYNC REPLICA `{table}_local`")).await;
    }
}

/// Invariant (exactly once across shards and replicas): a sink writing
/// through the Distributed table of two shards, one of them replicated,
/// creates its tables ON CLUSTER, writes each record once, recognises a
/// redelivery after a restart on another server, and every replica of a
/// shard ends with the same rows.
#[tokio::test]
async fn two_shards_with_replicas_write_through_distributed_exactly_once() {
    let _serial = SERIAL.lock().await;
    let table = unique("shards");
    let records = batch(0..4, 50);
    let mut sink = ClickHouseSink::new(
        config(&node(1), &table, "outbox_replicated", None)
            .validate()
            .unwrap(),
        RawEventMapper,
    )
    .await
    .unwrap();
    let first = sink.write(&records).await.unwrap();
    // The consumer restarted, connected to the other shard's server.
    let mut restarted = ClickHouseSink::new(
        config(&node(3), &table, "outbox_replicated", None)
            .validate()
            .unwrap(),
        RawEventMapper,
    )
    .await
    .unwrap();
    let again = restarted.write(&records).await.unwrap();
    sync_replicas(&table).await;
    let through_distributed = counts(&node(3), &table).await;
    let local = [
        counts(&node(1), &format!("{table}_local")).await.0,
        counts(&node(2), &format!("{table}_local")).await.0,
        counts(&node(3), &format!("{table}_local")).await.0,
    ];
    println!(
        "written={} redelivered_written={} duplicates={} distributed(rows,distinct)={through_distributed:?} \
         local rows ch1/ch2/ch3={local:?} settings={:?}",
        first.written, again.written, again.duplicates, restarted.write_settings()
    );
    assert_eq!(
        (first.written, again.written, again.duplicates),
        (200, 0, 200)
    );
    assert_eq!(through_distributed, (200, 200));
    assert_eq!(
        local[0], local[1],
        "the two replicas of shard 1 hold the same rows"
    );
    assert_eq!(local[0] + local[2], 200, "each row on one shard");
    assert!(local[0] > 0 && local[2] > 0, "both shards used: {local:?}");
}

/// `records` written again the way a redelivery after a rebalance arrives:
/// in other batches than the first time. The same batch written again
/// within the same second would be the same block, which a replicated table
/// drops by its block hash; that only hides the attack, it is no guarantee
/// (batches are cut by timing), so the attack never relies on it.
async fn redeliver(sink: &mut ClickHouseSink<RawEventMapper>, records: &[Record]) -> WriteReport {
    let (head, tail) = records.split_at(records.len() / 3);
    let first = sink.write(head).await.unwrap();
    let second = sink.write(tail).await.unwrap();
    WriteReport {
        written: first.written + second.written,
        duplicates: first.duplicates + second.duplicates,
        dead_lettered: [first.dead_lettered, second.dead_lettered].concat(),
    }
}

/// Invariant (a lookup never reads a replica behind an acknowledged write):
/// with replica ch2 not fetching, a write acknowledged on ch1 and
/// redelivered to a consumer on ch2 is written twice without a quorum (the
/// attack bites), and exactly once with the quorum the sink finds from the
/// cluster's definition (2 replicas per shard): the write on ch1 is not
/// acknowledged until ch2 has it too.
#[tokio::test]
async fn a_lagging_replica_is_never_read_with_the_quorum_it_finds() {
    let _serial = SERIAL.lock().await;
    // Without a quorum.
    let table = unique("lag_off");
    let records = batch(0..2, 50);
    let mut on_ch1 = ClickHouseSink::new(
        config(&node(1), &table, "outbox_shard1", Some(0))
            .validate()
            .unwrap(),
        RawEventMapper,
    )
    .await
    .unwrap();
    run(&node(2), &format!("SYSTEM STOP FETCHES `{table}_local`")).await;
    let first = on_ch1.write(&records).await.unwrap();
    let mut on_ch2 = ClickHouseSink::new(
        config(&node(2), &table, "outbox_shard1", Some(0))
            .validate()
            .unwrap(),
        RawEventMapper,
    )
    .await
    .unwrap();
    let again = redeliver(&mut on_ch2, &records).await;
    run(&node(2), &format!("SYSTEM START FETCHES `{table}_local`")).await;
    sync_replicas(&table).await;
    let without = counts(&node(1), &table).await;
    println!(
        "quorum off: written on ch1={} then on lagging ch2={} → (rows, distinct)={without:?}",
        first.written, again.written
    );
    assert!(
        without.0 > without.1,
        "the attack must bite without a quorum: {without:?}"
    );

    // With the quorum found from the cluster (2).
    let table = unique("lag_on");
    let mut on_ch1 = ClickHouseSink::new(
        config(&node(1), &table, "outbox_shard1", None)
            .validate()
            .unwrap(),
        RawEventMapper,
    )
    .await
    .unwrap();
    assert!(on_ch1
        .write_settings()
        .contains(&("insert_quorum", "2".to_string())));
    run(&node(2), &format!("SYSTEM STOP FETCHES `{table}_local`")).await;
    let refused = on_ch1.write(&records).await;
    println!(
        "quorum 2, ch2 not fetching: write on ch1 → {:?}",
        refused
            .as_ref()
            .map(|r| r.written)
            .map_err(|e| e.to_string())
    );
    assert!(
        refused.as_ref().is_err_and(|e| e.is_retryable()),
        "not acknowledged while a replica of the quorum lags"
    );
    run(&node(2), &format!("SYSTEM START FETCHES `{table}_local`")).await;
    sync_replicas(&table).await;
    // The retry (the consumer loop's) and a redelivery to ch2.
    let retried = on_ch1.write(&records).await.unwrap();
    let mut on_ch2 = ClickHouseSink::new(
        config(&node(2), &table, "outbox_shard1", None)
            .validate()
            .unwrap(),
        RawEventMapper,
    )
    .await
    .unwrap();
    let redelivered = redeliver(&mut on_ch2, &records).await;
    sync_replicas(&table).await;
    let with = counts(&node(2), &table).await;
    println!(
        "quorum 2: retry on ch1 wrote {} (skipped {}), redelivery on ch2 wrote {} → (rows, distinct)={with:?}",
        retried.written, retried.duplicates, redelivered.written
    );
    assert_eq!(redelivered.written, 0);
    assert_eq!(with, (100, 100));
}

fn cluster_script(args: &[&str]) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh");
    let status = std::process::Command::new(script)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "scripts/cluster.sh {args:?}");
}

/// Invariant (no loss, no duplicate, while a replica is down): with replica
/// ch2 stopped, quorum writes are refused (retryable) instead of being
/// acknowledged on one replica; once it is back, the retried batch lands
/// once on both replicas.
#[tokio::test]
async fn a_stopped_replica_holds_writes_back_until_it_returns() {
    let _serial = SERIAL.lock().await;
    let table = unique("stopped");
    let records = batch(0..2, 30);
    let mut sink = ClickHouseSink::new(
        config(&node(1), &table, "outbox_shard1", None)
            .validate()
            .unwrap(),
        RawEventMapper,
    )
    .await
    .unwrap();
    let warm = sink.write(&records[..10]).await.unwrap();
    cluster_script(&["stop-replica", "2"]);
    let while_down = sink.write(&records).await;
    cluster_script(&["start-replica", "2"]);
    let mut retried = None;
    for _ in 0..30 {
        match sink.write(&records).await {
            Ok(report) => {
                retried = Some(report);
                break;
            }
            Err(err) => {
                assert!(err.is_retryable(), "{err}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let retried = retried.expect("writes resume once the replica is back");
    sync_replicas(&table).await;
    let on_ch1 = counts(&node(1), &format!("{table}_local")).await;
    let on_ch2 = counts(&node(2), &format!("{table}_local")).await;
    println!(
        "warm written={} while ch2 down: {:?}; after: written={} skipped={} → ch1={on_ch1:?} ch2={on_ch2:?}",
        warm.written,
        while_down.as_ref().map(|r| r.written).map_err(|e| e.to_string()),
        retried.written,
        retried.duplicates
    );
    assert!(while_down.is_err_and(|e| e.is_retryable()));
    assert_eq!(on_ch1, (60, 60));
    assert_eq!(on_ch2, (60, 60));
}
