//! End-to-end tests: the real PostgreSQL, Kafka (tansu) and ClickHouse of
//! `scripts/stack.sh up`, the library loops and the shipped binaries.
//! Each test states the invariant it checks and prints its counts.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use outbox_core::{Event, Relay, RelayConfig};
use outbox_kafka::KafkaBus;
use outbox_pg::{migrate, Outbox, OutboxConfig, PgOutboxSource, ValidOutboxConfig};
use uuid::Uuid;

async fn outbox_tables(name: &str) -> (outbox_pg::deadpool_postgres::Pool, ValidOutboxConfig) {
    let pool = pg().create_pool().unwrap();
    let config = OutboxConfig {
        table: name.to_string(),
        dead_letter_table: format!("{name}_dead"),
        claim_timeout: Duration::from_secs(30),
        ..OutboxConfig::default()
    }
    .validate()
    .unwrap();
    let client = pool.get().await.unwrap();
    migrate(&client, &config).await.unwrap();
    (pool, config)
}

async fn enqueue_in_transactions(
    pool: &outbox_pg::deadpool_postgres::Pool,
    config: &ValidOutboxConfig,
    topic: &str,
    transactions: usize,
    per_transaction: usize,
    commit: bool,
) -> Vec<Uuid> {
    let outbox = Outbox::new(config);
    let mut client = pool.get().await.unwrap();
    let mut ids = Vec::new();
    for t in 0..transactions {
        let events: Vec<Event> = (0..per_transaction)
            .map(|i| {
                Event::new(topic, format!("{{\"t\":{t},\"i\":{i}}}"))
                    .with_key(format!("key{}", i % 13))
            })
            .collect();
        let tx = client.transaction().await.unwrap();
        outbox.enqueue(&tx, &events).await.unwrap();
        if commit {
            tx.commit().await.unwrap();
            ids.extend(events.iter().map(|e| e.id));
        } else {
            tx.rollback().await.unwrap();
        }
    }
    ids
}

async fn pending(pool: &outbox_pg::deadpool_postgres::Pool, table: &str) -> i64 {
    let client = pool.get().await.unwrap();
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Invariant (no loss, no phantom, no duplicate): events of committed
/// transactions are published exactly once; events of rolled-back
/// transactions never.
#[tokio::test]
async fn committed_events_published_once_rolled_back_never() {
    let name = unique("commit");
    let topic = name.clone();
    let (pool, config) = outbox_tables(&name).await;
    let committed = enqueue_in_transactions(&pool, &config, &topic, 10, 20, true).await;
    let rolled_back = enqueue_in_transactions(&pool, &config, &topic, 5, 20, false).await;
    assert!(rolled_back.is_empty());

    let source = PgOutboxSource::new(pool.clone(), "test", config);
    let bus = KafkaBus::new(kafka(&brokers())).unwrap();
    let relay = Relay::new(
        source,
        bus,
        RelayConfig {
            batch_size: 64,
            stop_when_idle: true,
            ..RelayConfig::default()
        },
    );
    let stats = within(
        Duration::from_secs(120),
        "the relay",
        relay.run(Default::default()),
    )
    .await
    .unwrap();

    let read = read_topic(&brokers(), &topic, committed.len(), Duration::from_secs(2)).await;
    let (total, distinct, duplicated) = count_ids(read.iter().filter_map(|r| r.event_id));
    let unexpected = read
        .iter()
        .filter(|r| !committed.contains(&r.event_id.unwrap()))
        .count();
    println!(
        "committed={} rolled_back=100 published={} in_kafka={total} distinct={distinct} duplicated={duplicated} phantom={unexpected} pending={}",
        committed.len(),
        stats.published,
        pending(&pool, &name).await
    );
    assert_eq!(stats.published, 200);
    assert_eq!((total, distinct, duplicated, unexpected), (200, 200, 0, 0));
    assert_eq!(pending(&pool, &name).await, 0);
}

/// Invariant (no duplicate with concurrent relays): two relays draining one
/// outbox at once publish every event exactly once (SKIP LOCKED claims).
#[tokio::test]
async fn two_relays_publish_each_event_once() {
    let name = unique("two_relays");
    let topic = name.clone();
    let (pool, config) = outbox_tables(&name).await;
    let committed = enqueue_in_transactions(&pool, &config, &topic, 40, 50, true).await;
    // The topic exists before the relays start, as in production; tansu
    // 0.6.0 has been seen to panic when idempotent producers race to create
    // and first produce to a new topic.
    outbox_kafka::ensure_topics(&kafka(&brokers()), &[topic.as_str()])
        .await
        .unwrap();

    let relay = |pool: outbox_pg::deadpool_postgres::Pool, config: ValidOutboxConfig| {
        let source = PgOutboxSource::new(pool, "test", config);
        let bus = KafkaBus::new(kafka(&brokers())).unwrap();
        Relay::new(
            source,
            bus,
            RelayConfig {
                batch_size: 100,
                stop_when_idle: true,
                ..RelayConfig::default()
            },
        )
    };
    let a = relay(pool.clone(), config.clone());
    let b = relay(pool.clone(), config.clone());
    let (sa, sb) = within(Duration::from_secs(120), "the two relays", async {
        tokio::join!(a.run(Default::default()), b.run(Default::default()))
    })
    .await;
    let (sa, sb) = (sa.unwrap(), sb.unwrap());

    let read = read_topic(&brokers(), &topic, committed.len(), Duration::from_secs(3)).await;
    let (total, distinct, duplicated) = count_ids(read.iter().filter_map(|r| r.event_id));
    println!(
        "committed={} relay_a={} relay_b={} in_kafka={total} distinct={distinct} duplicated={duplicated}",
        committed.len(),
        sa.published,
        sb.published
    );
    assert!(
        sa.published > 0 && sb.published > 0,
        "both relays should have worked"
    );
    assert_eq!(sa.published + sb.published, 2000);
    assert_eq!((total, distinct, duplicated), (2000, 2000, 0));
}

/// Invariant (no loss while the broker is down): with the broker stopped,
/// the relay reports a retryable failure and removes nothing; once the
/// broker is back, every event is published exactly once.
#[tokio::test]
async fn broker_down_keeps_events_pending_until_it_returns() {
    let name = unique("broker_down");
    let topic = name.clone();
    let mut broker = PrivateBroker::new();
    broker.start().await;
    outbox_kafka::ensure_topics(&kafka(&broker.brokers()), &[topic.as_str()])
        .await
        .unwrap();
    broker.kill();

    let (pool, config) = outbox_tables(&name).await;
    let committed = enqueue_in_transactions(&pool, &config, &topic, 5, 10, true).await;
    let source = PgOutboxSource::new(pool.clone(), "test", config);
    let bus = KafkaBus::new(kafka(&broker.brokers())).unwrap();
    let relay = Relay::new(
        source,
        bus,
        RelayConfig {
            stop_when_idle: true,
            ..RelayConfig::default()
        },
    );

    let outcome = relay.run_once().await;
    let kept = pending(&pool, &name).await;
    println!("broker down: outcome={outcome:?} pending={kept}");
    match outcome {
        Err(err) => assert!(err.is_retryable(), "{err}"),
        Ok(Some(summary)) => assert_eq!((summary.completed, summary.released), (0, 50)),
        Ok(None) => panic!("events were pending"),
    }
    assert_eq!(kept, 50, "nothing may be removed while the broker is down");

    broker.start().await;
    let stats = within(
        Duration::from_secs(120),
        "the relay",
        relay.run(Default::default()),
    )
    .await
    .unwrap();
    let read = read_topic(
        &broker.brokers(),
        &topic,
        committed.len(),
        Duration::from_secs(2),
    )
    .await;
    let (total, distinct, duplicated) = count_ids(read.iter().filter_map(|r| r.event_id));
    println!(
        "broker back: published={} in_kafka={total} distinct={distinct} duplicated={duplicated} pending={}",
        stats.published,
        pending(&pool, &name).await
    );
    assert_eq!((total, distinct, duplicated), (50, 50, 0));
    assert_eq!(pending(&pool, &name).await, 0);
}

async fn create_flag_table(table: &str, rows: usize) {
    let client = pg().create_pool().unwrap().get().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, username text NOT NULL, event_type text NOT NULL,
               event_time timestamptz NOT NULL DEFAULT now(), sent_to_kafka boolean NOT NULL DEFAULT false);
             INSERT INTO {table} (username, event_type, event_time)
               SELECT 'user' || (g % 7), CASE WHEN g % 2 = 0 THEN 'login' ELSE 'logout' END,
                      '2024-05-01 00:00:00+00'::timestamptz + g * interval '1 minute'
               FROM generate_series(1, {rows}) g;"
        ))
        .await
        .unwrap();
}

fn run_producer(table: &str, topic: &str) -> (bool, String) {
    let output = command("producer_pg_to_kafka")
        .args([
            "--drain",
            "--table",
            table,
            "--topic",
            topic,
            "--batch-size",
            "25",
        ])
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

fn run_consumer(
    topic: &str,
    table: &str,
    group: &str,
    idle_secs: u64,
    extra: &[&str],
) -> (bool, String) {
    let idle = idle_secs.to_string();
    let output = command("consumer_to_clickhouse")
        .args([
            "--topic",
            topic,
            "--clickhouse-table",
            table,
            "--group-id",
            group,
        ])
        .args([
            "--exit-after-idle-secs",
            &idle,
            "--session-timeout-ms",
            "6000",
        ])
        .args(["--max-poll-interval-ms", "7000"])
        .args(extra)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// Invariant (the demo, exactly once): `user_logins`-style rows flow through
/// the shipped binaries into ClickHouse once each; a rerun publishes nothing
/// twice; rows added later are picked up; every flag ends set.
#[tokio::test]
async fn demo_path_end_to_end_with_reruns() {
    let table = unique("logins");
    let topic = table.clone();
    let group = unique("group");
    create_flag_table(&table, 120).await;

    let (ok, out) = run_producer(&table, &topic);
    assert!(ok, "{out}");
    assert!(out.contains("published 120 events"), "{out}");
    let (ok, out) = run_producer(&table, &topic);
    assert!(
        ok && out.contains("published 0 events"),
        "rerun must publish nothing: {out}"
    );
    let (ok, out) = run_consumer(&topic, &table, &group, 6, &[]);
    assert!(ok, "{out}");
    assert_eq!(ch_counts(&table).await, (120, 120));

    // Rows added later, and the consumer restarted: it resumes where it left off.
    let client = pg().create_pool().unwrap().get().await.unwrap();
    client
        .execute(&format!("INSERT INTO {table} (username, event_type) VALUES ('late', 'login'), ('late', 'logout')"), &[])
        .await
        .unwrap();
    let (ok, out) = run_producer(&table, &topic);
    assert!(ok && out.contains("published 2 events"), "{out}");
    let (ok, out) = run_consumer(&topic, &table, &group, 6, &[]);
    assert!(ok, "{out}");

    let (rows, distinct) = ch_counts(&table).await;
    let unsent: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE NOT sent_to_kafka"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let ids = ch_query(&format!(
        "SELECT min(id), max(id), uniqExact(id) FROM `{table}` FORMAT TabSeparated"
    ))
    .await;
    println!("postgres_rows=122 clickhouse_rows={rows} distinct_events={distinct} unsent={unsent} ids(min,max,distinct)={ids}");
    assert_eq!((rows, distinct, unsent), (122, 122, 0));
    assert_eq!(ids, "1\t122\t122");
    let late = ch_query(&format!(
        "SELECT count() FROM `{table}` WHERE username = 'late' FORMAT TabSeparated"
    ))
    .await;
    assert_eq!(late, "2");
}

/// Invariant (no duplicate, no loss, when the consumer is killed at random
/// points, including between a ClickHouse insert and its Kafka commit):
/// ClickHouse ends with each event exactly once. Mechanism checked: Kafka
/// positions stored with the rows, offsets already stored skipped.
#[tokio::test]
async fn consumer_killed_repeatedly_writes_each_event_once() {
    let topic = unique("kill");
    let table = topic.clone();
    let group = unique("group");
    let bus = KafkaBus::new(kafka(&brokers())).unwrap();
    let mut ids = Vec::new();
    for chunk in 0..10 {
        let events: Vec<Event> = (0..400)
            .map(|i| {
                Event::new(topic.clone(), format!("{{\"chunk\":{chunk},\"i\":{i}}}"))
                    .with_key(format!("k{}", i % 11))
            })
            .collect();
        let deliveries = outbox_core::Bus::publish(&bus, &events).await.unwrap();
        assert!(deliveries.iter().all(|d| d.is_acknowledged()));
        ids.extend(events.iter().map(|e| e.id));
    }
    let total = ids.len() as u64;

    let spawn = || {
        command("consumer_to_clickhouse")
            .args([
                "--topic",
                &topic,
                "--clickhouse-table",
                &table,
                "--group-id",
                &group,
                "--format",
                "raw",
                "--batch-size",
                "150",
                "--batch-wait-ms",
                "20",
                "--session-timeout-ms",
                "6000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    let mut seen_before_kill = Vec::new();
    for round in 0..6u64 {
        let before = ch_count(&table).await;
        let mut child = spawn();
        // Wait until this consumer writes, then kill it mid-stream.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while ch_count(&table).await == before && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(15 + (round * 37) % 60)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        seen_before_kill.push(ch_count(&table).await);
        if ch_count(&table).await >= total {
            break;
        }
    }
    let mut last = spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while ch_count(&table).await < total && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // anything extra would land now
    let status = terminate(&mut last, Duration::from_secs(20));
    let (rows, distinct) = ch_counts(&table).await;
    println!(
        "published={total} kills={kills} rows_at_each_kill={seen_before_kill:?} clickhouse_rows={rows} distinct={distinct} lost={} duplicated={}",
        total.saturating_sub(distinct),
        rows - distinct
    );
    assert!(
        matches!(status, Some(s) if s.success()),
        "consumer must stop cleanly on SIGTERM: {status:?}"
    );
    assert_eq!((rows, distinct), (total, total));
}

/// Invariant (clean stop): SIGTERM stops both binaries with exit code 0 in
/// bounded time, and nothing pending is lost.
#[tokio::test]
async fn sigterm_stops_binaries_cleanly() {
    let table = unique("sigterm");
    create_flag_table(&table, 10).await;
    let mut producer = command("producer_pg_to_kafka")
        .args(["--table", &table, "--topic", &table])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut consumer = command("consumer_to_clickhouse")
        .args([
            "--topic",
            &table,
            "--clickhouse-table",
            &table,
            "--group-id",
            &unique("g"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while tokio::time::Instant::now() < deadline {
        let have = ch_query(&format!("EXISTS TABLE `{table}` FORMAT TabSeparated")).await;
        if have == "1" && ch_count(&table).await == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let p = terminate(&mut producer, Duration::from_secs(15));
    let c = terminate(&mut consumer, Duration::from_secs(15));
    println!(
        "producer_exit={p:?} consumer_exit={c:?} rows={}",
        ch_count(&table).await
    );
    assert!(matches!(p, Some(s) if s.success()), "{p:?}");
    assert!(matches!(c, Some(s) if s.success()), "{c:?}");
    assert_eq!(ch_counts(&table).await, (10, 10));
}

/// Invariant (a stuck stop is told from a clean one): a consumer whose
/// ClickHouse stops answering mid-insert (its path blackholed) and that is
/// then asked to stop exits after the drain timeout with code 124, not 0;
/// what it was writing stays uncommitted, and a restarted consumer writes
/// every event once.
#[tokio::test]
async fn a_drain_that_times_out_exits_non_zero() {
    let table = unique("stuck");
    let group = unique("g");
    let upstream = tokio::net::lookup_host(clickhouse_url().trim_start_matches("http://"))
        .await
        .unwrap()
        .find(|addr| addr.is_ipv4())
        .unwrap();
    let proxy = netfault::FaultProxy::start(upstream).await.unwrap();
    let via_proxy = format!("http://127.0.0.1:{}", proxy.addr().port());
    let bus = KafkaBus::new(kafka(&brokers())).unwrap();
    let publish = |n: usize| {
        let events: Vec<Event> = (0..n)
            .map(|i| Event::new(table.clone(), format!("{{\"i\":{i}}}")).with_key(format!("k{i}")))
            .collect();
        let bus = &bus;
        async move {
            let deliveries = outbox_core::Bus::publish(bus, &events).await.unwrap();
            assert!(deliveries.iter().all(|d| d.is_acknowledged()));
        }
    };
    let consumer = |url: &str| {
        command("consumer_to_clickhouse")
            .args(["--topic", &table, "--clickhouse-table", &table])
            .args(["--group-id", &group, "--format", "raw"])
            .args(["--clickhouse-url", url, "--drain-timeout-secs", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    publish(20).await;
    let mut stuck = consumer(&via_proxy);
    within(Duration::from_secs(40), "the first rows", async {
        while ch_query(&format!("EXISTS TABLE `{table}` FORMAT TabSeparated")).await != "1"
            || ch_count(&table).await < 20
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    proxy.set(netfault::Fault::Blackhole, netfault::Fault::Blackhole);
    publish(30).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = std::time::Instant::now();
    let status = terminate(&mut stuck, Duration::from_secs(20));
    let took = stopped.elapsed();
    println!("stuck consumer: exit={status:?} after {took:?} (drain timeout 2 s)");
    assert_eq!(status.and_then(|s| s.code()), Some(124));
    assert!(took < Duration::from_secs(6), "{took:?}");

    let mut healthy = consumer(&clickhouse_url());
    within(Duration::from_secs(40), "every row", async {
        while ch_count(&table).await < 50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = terminate(&mut healthy, Duration::from_secs(15));
    assert!(matches!(status, Some(s) if s.success()), "{status:?}");
    assert_eq!(ch_counts(&table).await, (50, 50));
}

/// Bad input: an invalid identifier, wrong credentials and unreachable
/// services each give a clear message naming the problem and a non-zero exit.
#[tokio::test]
async fn bad_configuration_fails_clearly() {
    // (binary, arguments, environment, expected text in the error line)
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let bad_file = std::env::temp_dir().join(format!("{}.toml", unique("bad_config")));
    std::fs::write(&bad_file, "batch_sise = 10\n").unwrap();
    let bad_file = bad_file.to_string_lossy().into_owned();
    let cases: Vec<Case<'_>> = vec![
        (
            "producer_pg_to_kafka",
            vec!["--config", &bad_file],
            vec![],
            "unknown key `batch_sise`",
        ),
        (
            "producer_pg_to_kafka",
            vec![
                "--kafka-properties",
                "security.protocol=SSL,secret-without-key",
            ],
            vec![],
            "entry 2 is not key=value",
        ),
        (
            "producer_pg_to_kafka",
            vec!["--metrics-addr", "everywhere"],
            vec![],
            "--metrics-addr",
        ),
        (
            "producer_pg_to_kafka",
            vec![
                "--source",
                "outbox",
                "--outbox-table",
                "outbox\"; DROP TABLE user_logins; --",
            ],
            vec![],
            "invalid identifier",
        ),
        (
            "outbox",
            vec!["--dead-letter-table", "dead letters", "status"],
            vec![],
            "invalid identifier",
        ),
        (
            "consumer_to_clickhouse",
            vec!["--clickhouse-database", "default`; DROP TABLE user_logins"],
            vec![],
            "invalid clickhouse",
        ),
        (
            "producer_pg_to_kafka",
            vec!["--table", "user_logins; DROP TABLE x"],
            vec![],
            "invalid identifier",
        ),
        (
            "producer_pg_to_kafka",
            vec!["--startup-timeout-secs", "1"],
            vec![("OUTBOX_PG_PASSWORD", "wrong-secret")],
            "password",
        ),
        (
            "producer_pg_to_kafka",
            vec!["--pg-port", "1", "--startup-timeout-secs", "1"],
            vec![],
            "postgres at 127.0.0.1:1/test_db",
        ),
        (
            "producer_pg_to_kafka",
            vec![
                "--kafka-brokers",
                "127.0.0.1:1",
                "--startup-timeout-secs",
                "1",
            ],
            vec![],
            "kafka at 127.0.0.1:1",
        ),
        (
            "consumer_to_clickhouse",
            vec!["--clickhouse-table", "bad-name"],
            vec![],
            "invalid clickhouse table",
        ),
        (
            "consumer_to_clickhouse",
            vec![
                "--clickhouse-url",
                "http://127.0.0.1:1",
                "--startup-timeout-secs",
                "1",
            ],
            vec![],
            "clickhouse at http://127.0.0.1:1",
        ),
        (
            "consumer_to_clickhouse",
            vec!["--startup-timeout-secs", "1"],
            vec![("OUTBOX_CLICKHOUSE_PASSWORD", "wrong-secret")],
            "user and password",
        ),
    ];
    for (binary, args, env, expected) in cases {
        let mut cmd = command(binary);
        cmd.args(&args);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_default()
            .to_string();
        println!(
            "{binary} {args:?} -> exit={:?} {last}",
            output.status.code()
        );
        assert!(!output.status.success(), "{binary} {args:?} should fail");
        assert!(
            last.contains(expected),
            "{binary} {args:?}: expected {expected:?} in {stderr}"
        );
        assert!(!stderr.contains("wrong-secret"), "secret leaked: {stderr}");
        assert!(
            !stderr.contains("secret-without-key"),
            "secret leaked: {stderr}"
        );
    }
}

/// First copies of `key:seq` payloads that break their key's sequence 0, 1,
/// 2, … in Kafka order (publish order within a partition; one key has one
/// partition). Later copies of an event are skipped, as sinks skip them.
fn out_of_order(read: &[Read]) -> usize {
    let mut by_partition = read.to_vec();
    by_partition.sort_by_key(|r| (r.partition, r.offset));
    let mut next_seq: std::collections::HashMap<String, u32> = Default::default();
    let mut first_seen = std::collections::HashSet::new();
    let mut out_of_order = 0;
    for record in &by_partition {
        if !first_seen.insert(record.event_id) {
            continue;
        }
        let (key, seq) = record.payload.split_once(':').unwrap();
        let seq: u32 = seq.parse().unwrap();
        let expected = next_seq.entry(key.to_string()).or_insert(0);
        if seq != *expected {
            out_of_order += 1;
        }
        *expected = seq + 1;
    }
    out_of_order
}

/// Invariant (per-key order with concurrent relays): events of one key,
/// enqueued in order by separate committed transactions, appear in Kafka
/// (first occurrence of each) in that order, and each exactly once, when
/// three relays drain the backlog at once. (Plain SKIP LOCKED over rows
/// fails this: a relay publishes event n+1 of a key while another still
/// holds event n.)
#[tokio::test]
async fn three_relays_keep_per_key_order() {
    let name = unique("order");
    let topic = name.clone();
    let (pool, config) = outbox_tables(&name).await;
    let keys = 24;
    let per_key = 80;

    // The backlog: one event per transaction, keys interleaved.
    let outbox = Outbox::new(&config);
    let mut client = pool.get().await.unwrap();
    for seq in 0..per_key {
        for key in 0..keys {
            let event =
                Event::new(topic.clone(), format!("{key}:{seq}")).with_key(format!("key{key}"));
            let tx = client.transaction().await.unwrap();
            outbox.enqueue(&tx, &[event]).await.unwrap();
            tx.commit().await.unwrap();
        }
    }

    outbox_kafka::ensure_topics(&kafka(&brokers()), &[topic.as_str()])
        .await
        .unwrap();
    let mut relays = Vec::new();
    for _ in 0..3 {
        let source = PgOutboxSource::new(pool.clone(), "test", config.clone());
        let bus = KafkaBus::new(kafka(&brokers())).unwrap();
        let relay = Relay::new(
            source,
            bus,
            RelayConfig {
                batch_size: 16,
                stop_when_idle: true,
                ..RelayConfig::default()
            },
        );
        relays.push(tokio::spawn(
            async move { relay.run(Default::default()).await },
        ));
    }
    let mut published = Vec::new();
    for relay in relays {
        let stats = within(Duration::from_secs(120), "a relay", relay).await;
        published.push(stats.unwrap().unwrap().published);
    }

    let total = (keys * per_key) as usize;
    let read = read_topic(&brokers(), &topic, total, Duration::from_secs(2)).await;
    let out_of_order = out_of_order(&read);
    let (in_kafka, distinct, duplicated) = count_ids(read.iter().filter_map(|r| r.event_id));
    println!(
        "keys={keys} per_key={per_key} relays_published={published:?} in_kafka={in_kafka} distinct={distinct} duplicated={duplicated} out_of_order={out_of_order} pending={}",
        pending(&pool, &name).await
    );
    assert!(
        published.iter().filter(|p| **p > 0).count() >= 2,
        "relays should share the work"
    );
    assert_eq!(
        (in_kafka, distinct, duplicated, out_of_order),
        (total, total, 0, 0)
    );
}

/// Invariant (per-key order and exactly one copy while claims grow in
/// flight): three relays, two keeping their claims open for a 200 ms window
/// (woken by NOTIFY, extending into their lanes as events arrive) and one
/// without, work one outbox while a writer commits events of 24 keys one
/// transaction at a time; every event reaches Kafka once, each key in its
/// commit order, and the windows really grew claims.
#[tokio::test]
async fn relays_with_claim_windows_keep_per_key_order_while_events_arrive() {
    let name = unique("window");
    let topic = name.clone();
    let (pool, config) = outbox_tables(&name).await;
    let (keys, per_key) = (24, 40);
    outbox_kafka::ensure_topics(&kafka(&brokers()), &[topic.as_str()])
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut relays = Vec::new();
    for window_ms in [200, 200, 0] {
        let source =
            PgOutboxSource::new(pool.clone(), "test", config.clone()).listen_for_events(pg());
        let bus = KafkaBus::new(kafka(&brokers())).unwrap();
        let relay = Relay::new(
            source,
            bus,
            RelayConfig {
                claim_window: Duration::from_millis(window_ms),
                ..RelayConfig::default()
            },
        );
        let stop = shutdown.clone();
        relays.push(tokio::spawn(async move { relay.run(stop).await }));
    }
    let outbox = Outbox::new(&config);
    let mut client = pool.get().await.unwrap();
    for seq in 0..per_key {
        for key in 0..keys {
            let event =
                Event::new(topic.clone(), format!("{key}:{seq}")).with_key(format!("key{key}"));
            let tx = client.transaction().await.unwrap();
            outbox.enqueue(&tx, &[event]).await.unwrap();
            tx.commit().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    within(Duration::from_secs(60), "the outbox to drain", async {
        while pending(&pool, &name).await > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    shutdown.cancel();
    let mut batches = Vec::new();
    let mut published = Vec::new();
    for relay in relays {
        let stats = within(Duration::from_secs(30), "a relay", relay)
            .await
            .unwrap()
            .unwrap();
        batches.push(stats.batches);
        published.push(stats.published);
    }
    let total = (keys * per_key) as usize;
    let read = read_topic(&brokers(), &topic, total, Duration::from_secs(2)).await;
    let out_of_order = out_of_order(&read);
    let (in_kafka, distinct, duplicated) = count_ids(read.iter().filter_map(|r| r.event_id));
    println!(
        "keys={keys} per_key={per_key} windows=[200,200,0] batches={batches:?} published={published:?} \
         in_kafka={in_kafka} distinct={distinct} duplicated={duplicated} out_of_order={out_of_order}"
    );
    assert_eq!(
        (in_kafka, distinct, duplicated, out_of_order),
        (total, total, 0, 0)
    );
    let windowed_events: u64 = published[..2].iter().sum();
    let windowed_batches: u64 = batches[..2].iter().sum();
    assert!(
        windowed_batches > 0 && windowed_events / windowed_batches > 5,
        "the windows grew claims: {windowed_events} events in {windowed_batches} claims"
    );
}

/// Invariant (no duplicate in ClickHouse when a relay dies after the
/// broker's acknowledgement and before its commit): the batch is published
/// again, so Kafka holds two copies, and ClickHouse still holds each event
/// once (count() = uniqExact(event_id) = committed, no FINAL). Mechanism
/// checked: the sink's window of recent event ids; copies land in the same
/// partition (by key, and by id for keyless events).
#[tokio::test]
async fn relay_crash_after_ack_leaves_no_duplicate_in_clickhouse() {
    use outbox_core::{Bus, Source};
    let name = unique("relay_crash");
    let topic = name.clone();
    let (pool, config) = outbox_tables(&name).await;
    outbox_kafka::ensure_topics(&kafka(&brokers()), &[topic.as_str()])
        .await
        .unwrap();
    let mut committed = enqueue_in_transactions(&pool, &config, &topic, 4, 25, true).await;
    // Keyless events too: they must land beside their first copy.
    let keyless: Vec<Event> = (0..20)
        .map(|i| Event::new(topic.clone(), format!("{{\"keyless\":{i}}}")))
        .collect();
    let client = pool.get().await.unwrap();
    Outbox::new(&config)
        .enqueue(&client, &keyless)
        .await
        .unwrap();
    committed.extend(keyless.iter().map(|e| e.id));

    let source = PgOutboxSource::new(pool.clone(), "test", config.clone());
    let bus = KafkaBus::new(kafka(&brokers())).unwrap();
    // The crash: published and acknowledged, never committed.
    let claimed = source.claim(1000).await.unwrap().unwrap();
    let deliveries = bus.publish(&claimed.events).await.unwrap();
    let published_before_crash = deliveries.iter().filter(|d| d.is_acknowledged()).count();
    drop(claimed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let relay = Relay::new(
        source,
        bus,
        RelayConfig {
            stop_when_idle: true,
            ..RelayConfig::default()
        },
    );
    let stats = within(
        Duration::from_secs(120),
        "the relay",
        relay.run(Default::default()),
    )
    .await
    .unwrap();

    let read = read_topic(
        &brokers(),
        &topic,
        committed.len() + published_before_crash,
        Duration::from_secs(2),
    )
    .await;
    let (in_kafka, distinct_in_kafka, _) = count_ids(read.iter().filter_map(|r| r.event_id));

    let (ok, out) = run_consumer(&topic, &name, &unique("group"), 6, &["--format", "raw"]);
    assert!(ok, "{out}");
    let (rows, distinct) = ch_counts(&name).await;
    println!(
        "committed={} published_before_crash={published_before_crash} republished={} in_kafka={in_kafka} distinct_in_kafka={distinct_in_kafka} clickhouse_rows={rows} distinct={distinct}",
        committed.len(),
        stats.published
    );
    assert!(
        in_kafka > committed.len(),
        "the crash must have produced copies in Kafka"
    );
    assert_eq!(distinct_in_kafka, committed.len());
    assert_eq!(
        (rows, distinct),
        (committed.len() as u64, committed.len() as u64)
    );
}

/// Invariant (no stalled partition, no duplicate, a group of three, on
/// cluster tables): three consumers share a 6-partition topic through
/// leases, each working some, writing through a `Distributed` table (the
/// stack's one-node cluster `outbox_local`); one is SIGKILLed and never
/// restarted; the two survivors take its partitions over within the lease
/// timeout and ClickHouse ends with each event exactly once, in the
/// Distributed table and in the shard's local table alike.
#[tokio::test]
async fn dead_consumer_partitions_are_taken_over() {
    let topic = unique("takeover");
    let group = unique("group");
    let six = outbox_kafka::KafkaConfig {
        topic_partitions: 6,
        ..kafka(&brokers())
    };
    outbox_kafka::ensure_topics(&six, &[topic.as_str()])
        .await
        .unwrap();
    let patient = outbox_kafka::KafkaConfig {
        message_timeout: Duration::from_secs(60),
        ..kafka(&brokers())
    };
    let bus = KafkaBus::new(patient).unwrap();
    let publish = |from: usize| {
        let events: Vec<Event> = (from..from + 1000)
            .map(|i| {
                Event::new(topic.clone(), format!("{{\"i\":{i}}}")).with_key(format!("k{}", i % 37))
            })
            .collect();
        events
    };
    for chunk in [0, 1000] {
        let events = publish(chunk);
        assert!(outbox_core::Bus::publish(&bus, &events)
            .await
            .unwrap()
            .iter()
            .all(|d| d.is_acknowledged()));
    }

    let logs = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&logs).unwrap();
    let spawn = |log: &str| {
        command("consumer_to_clickhouse")
            .args([
                "--topic",
                &topic,
                "--clickhouse-table",
                &topic,
                "--group-id",
                &group,
                "--format",
                "raw",
                "--assignment",
                "leased",
                "--lease-timeout-ms",
                "3000",
                "--batch-size",
                "100",
                "--clickhouse-cluster",
                "outbox_local",
                "--clickhouse-on-cluster",
                "false",
                "--clickhouse-replicated",
                "false",
                "--clickhouse-dead-letter-table",
                &format!("{topic}_dead"),
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(logs.join(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let mut doomed = spawn("doomed.log");
    let mut survivor = spawn("survivor.log");
    let mut second = spawn("second.log");
    // All three must own partitions before one dies.
    let owned = |log: &str| {
        std::fs::read_to_string(logs.join(log))
            .unwrap_or_default()
            .lines()
            .rfind(|l| l.contains("working partitions"))
            .map(|l| !l.contains("partitions=[]"))
            .unwrap_or(false)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while !(owned("doomed.log")
        && owned("survivor.log")
        && owned("second.log")
        && ch_count(&topic).await > 0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumers never shared the partitions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    doomed.kill().unwrap(); // SIGKILL, never restarted
    doomed.wait().unwrap();
    let killed_at = std::time::Instant::now();
    let killed_at_s = ch_query("SELECT toUInt32(now()) FORMAT TabSeparated").await;
    for chunk in [2000, 3000] {
        let events = publish(chunk);
        let started = std::time::Instant::now();
        let deliveries = outbox_core::Bus::publish(&bus, &events).await.unwrap();
        let failed = deliveries.iter().find(|d| !d.is_acknowledged());
        println!("publish after the kill took {:?}", started.elapsed());
        assert!(failed.is_none(), "publish after the kill: {failed:?}");
    }
    // Generous: tansu 0.6 was seen to stall for tens of seconds after a
    // consumer of the group was killed (its produce and offset fetch
    // requests time out meanwhile); the takeover itself takes the lease
    // timeout (3 s here).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    while ch_count(&topic).await < 4000 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = terminate(&mut survivor, Duration::from_secs(20));
    let second_status = terminate(&mut second, Duration::from_secs(20));
    let (rows, distinct) = ch_counts(&topic).await;
    let (local_rows, local_distinct) = ch_counts(&format!("{topic}_local")).await;
    let engine = ch_query(&format!(
        "SELECT engine FROM system.tables WHERE database = 'default' AND name = '{topic}' FORMAT TabSeparated"
    ))
    .await;
    let partitions_after_kill = ch_query(&format!(
        "SELECT uniqExact(kafka_partition) FROM `{topic}` WHERE ingested_at >= {killed_at_s} FORMAT TabSeparated"
    ))
    .await;
    let doomed_owned: Vec<String> = std::fs::read_to_string(logs.join("doomed.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("working partitions"))
        .map(|l| {
            l.split("partitions=")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect();
    println!(
        "published=4000 consumers=3 partitions=6 killed=1 doomed_owned={doomed_owned:?} drained_after_kill={drained_after:?} partitions_written_after_kill={partitions_after_kill} engine={engine} clickhouse_rows={rows} distinct={distinct} local_rows={local_rows} local_distinct={local_distinct} lost={} duplicated={}",
        4000u64.saturating_sub(distinct),
        rows - distinct
    );
    assert!(matches!(status, Some(s) if s.success()), "{status:?}");
    assert!(
        matches!(second_status, Some(s) if s.success()),
        "{second_status:?}"
    );
    assert_eq!((rows, distinct), (4000, 4000));
    assert_eq!(engine, "Distributed");
    assert_eq!((local_rows, local_distinct), (4000, 4000));
    assert_eq!(
        partitions_after_kill, "6",
        "the survivors must write every partition after the kill"
    );
}

/// A committed event wakes an idle relay at once (LISTEN/NOTIFY) instead of
/// at its next poll: with a 30 s poll interval, the event is in Kafka within
/// a few seconds.
#[tokio::test]
async fn committed_event_wakes_the_idle_relay() {
    let name = unique("wake");
    let topic = name.clone();
    let (pool, config) = outbox_tables(&name).await;
    outbox_kafka::ensure_topics(&kafka(&brokers()), &[topic.as_str()])
        .await
        .unwrap();
    let source = PgOutboxSource::new(pool.clone(), "test", config.clone()).listen_for_events(pg());
    let bus = KafkaBus::new(kafka(&brokers())).unwrap();
    let relay = Relay::new(
        source,
        bus,
        RelayConfig {
            idle_wait: Duration::from_secs(30),
            ..RelayConfig::default()
        },
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { relay.run(token).await });
    tokio::time::sleep(Duration::from_secs(2)).await; // the relay is idle now

    let started = std::time::Instant::now();
    let ids = enqueue_in_transactions(&pool, &config, &topic, 1, 1, true).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pending(&pool, &name).await > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let latency = started.elapsed();
    stop.cancel();
    let stats = within(Duration::from_secs(30), "the relay", running)
        .await
        .unwrap()
        .unwrap();
    println!(
        "poll_interval=30s commit_to_published={latency:?} published={}",
        stats.published
    );
    assert_eq!(ids.len(), 1);
    assert_eq!(stats.published, 1);
    assert!(
        latency < Duration::from_secs(5),
        "the relay was not woken: {latency:?}"
    );
}

/// Invariant (no silent loss when a topic starts over): the demo path, on a
/// broker of its own; after its topic is deleted (as tansu 0.6 does to every
/// topic on any DeleteTopics) the relay creates it again and publishes new
/// rows from offset 0. The consumer must stop with an error that says the
/// topic started over, write none of them over the old positions, and skip
/// none as duplicates; the new events stay readable in Kafka.
#[tokio::test]
async fn a_demo_topic_that_starts_over_stops_the_consumer_instead_of_losing_rows() {
    let mut broker = PrivateBroker::new();
    broker.start().await;
    let brokers = broker.brokers();
    let table = unique("reborn");
    let topic = table.clone();
    let group = unique("group");
    create_flag_table(&table, 100).await;
    let relay = || {
        let output = command("producer_pg_to_kafka")
            .args(["--drain", "--table", &table, "--topic", &topic])
            .args(["--kafka-brokers", &brokers])
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let consumer = || {
        let output = command("consumer_to_clickhouse")
            .args(["--topic", &topic, "--clickhouse-table", &table])
            .args(["--group-id", &group, "--kafka-brokers", &brokers])
            .args(["--exit-after-idle-secs", "6"])
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (ok, out) = relay();
    assert!(ok && out.contains("published 100 events"), "{out}");
    let (ok, out) = consumer();
    assert!(ok, "{out}");
    assert_eq!(ch_counts(&table).await, (100, 100));

    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
    let options = rdkafka::admin::AdminOptions::new();
    // Safe only because `brokers` is this test's private tansu (own port,
    // own data directory): tansu 0.6 deletes every topic on any
    // DeleteTopics, which is the very "topic starts over" this test needs.
    admin.delete_topics(&[&topic], &options).await.unwrap();
    let client = pg().create_pool().unwrap().get().await.unwrap();
    client
        .execute(
            &format!(
                "INSERT INTO {table} (username, event_type) \
                 SELECT 'after', 'login' FROM generate_series(1, 200)"
            ),
            &[],
        )
        .await
        .unwrap();
    let (ok, out) = relay();
    assert!(ok && out.contains("published 200 events"), "{out}");
    let (ok, out) = consumer();
    let (rows, _) = ch_counts(&table).await;
    let in_kafka = read_topic(&brokers, &topic, 200, Duration::from_secs(1))
        .await
        .len();
    println!(
        "old_rows=100 new_rows=200 consumer_ok={ok} clickhouse_rows={rows} new_events_in_kafka={in_kafka} consumer_said={:?}",
        out.lines().last().unwrap_or_default()
    );
    assert!(!ok, "the consumer must stop: {out}");
    assert!(out.contains("started over"), "{out}");
    assert_eq!(rows, 100, "nothing written over the old positions");
    assert_eq!(in_kafka, 200, "the new events wait in Kafka");
}
