//! End-to-end tests of the WAL source through the shipped binaries:
//! `producer_pg_to_kafka --source wal` against the stack's PostgreSQL,
//! Kafka and ClickHouse.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

/// A relay process killed when dropped, so a failing test leaves none
/// streaming its slot.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A captured table `<name>` (id primary key, n counter), its slot and
/// publication `<name>`, and the relay binary streaming it to topic `<name>`.
struct WalPipeline {
    name: String,
    pool: outbox_pg::deadpool_postgres::Pool,
}

impl WalPipeline {
    async fn new(name: &str) -> Self {
        Self::with_table(
            name,
            &format!(
                "CREATE TABLE {name} (id int PRIMARY KEY, n int NOT NULL);
                 INSERT INTO {name} SELECT g, 0 FROM generate_series(1, 20) g;"
            ),
        )
        .await
    }

    /// The pipeline of a table `<name>` created (and filled) by `setup`.
    async fn with_table(name: &str, setup: &str) -> Self {
        let pool = pg().create_pool().unwrap();
        let client = pool.get().await.unwrap();
        // Slots of earlier runs that failed before their cleanup pin WAL.
        // Only those untouched for minutes: the tests of this file run at
        // once, and another's slot may be idle between its steps.
        client
            .batch_execute(
                "DO $$ BEGIN IF to_regclass('outbox_wal_progress') IS NOT NULL THEN \
                   PERFORM pg_drop_replication_slot(s.slot_name) FROM pg_replication_slots s \
                   JOIN outbox_wal_progress p ON p.slot = s.slot_name \
                   WHERE s.slot_name LIKE 'e2e\\_wal\\_%' AND NOT s.active \
                     AND p.updated_at < now() - interval '5 minutes'; \
                 END IF; END $$",
            )
            .await
            .unwrap();
        client.batch_execute(setup).await.unwrap();
        outbox_kafka::ensure_topics(&kafka(&brokers()), &[name])
            .await
            .unwrap();
        Self {
            name: name.to_string(),
            pool,
        }
    }

    fn relay(&self) -> Relay {
        self.relay_with(&[])
    }

    fn relay_with(&self, extra: &[&str]) -> Relay {
        let table = format!("public.{}={}", self.name, self.name);
        command("producer_pg_to_kafka")
            .args(["--source", "wal", "--wal-table", &table])
            .args(extra)
            .args(["--wal-slot", &self.name, "--wal-publication", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Relay)
            .unwrap()
    }

    /// Waits until a relay streams the slot (30 s at most).
    async fn wait_streaming(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.slot_active().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay never streamed the slot"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the slot's initial load is published (30 s at most):
    /// after it, the loaded rows are all before the changes of this test's
    /// writers, whose order check counts each update as one step.
    async fn wait_loaded(&self) {
        let client = self.pool.get().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let loaded = client
                .query_opt(
                    "SELECT loaded FROM outbox_wal_progress WHERE slot = $1",
                    &[&self.name],
                )
                .await
                .unwrap()
                .is_some_and(|row| row.get::<_, bool>(0));
            if loaded {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay never published the initial load"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn slot_active(&self) -> bool {
        let client = self.pool.get().await.unwrap();
        client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.name],
            )
            .await
            .unwrap()
            .is_some_and(|row| row.get::<_, bool>(0))
    }

    async fn cleanup(&self) {
        let client = self.pool.get().await.unwrap();
        test_support::drop_slot(&client, &self.name).await.unwrap();
        let _ = client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {name};
                 DELETE FROM outbox_wal_progress WHERE slot = '{name}';
                 DROP TABLE IF EXISTS {name};",
                name = self.name
            ))
            .await;
    }
}

/// Runs the consumer on topic `name` into the raw ClickHouse table `name`
/// until it is idle; whether it exited cleanly, and its log.
fn consume_into_clickhouse(name: &str) -> (bool, String) {
    let output = command("consumer_to_clickhouse")
        .args(["--topic", name, "--clickhouse-table", name])
        .args(["--group-id", &unique("group"), "--format", "raw"])
        .args([
            "--exit-after-idle-secs",
            "6",
            "--session-timeout-ms",
            "6000",
        ])
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Writes `transactions` transactions, each an insert of a new row and
/// three increments of random rows among 1..=20; returns how many changes
/// committed.
async fn write(
    pool: outbox_pg::deadpool_postgres::Pool,
    table: String,
    first_id: i32,
    transactions: i32,
) -> usize {
    let mut client = pool.get().await.unwrap();
    let mut changes = 0;
    for t in 0..transactions {
        let tx = client.transaction().await.unwrap();
        tx.execute(
            &format!("INSERT INTO {table} VALUES ($1, 0)"),
            &[&(first_id + t)],
        )
        .await
        .unwrap();
        // Rows locked in id order, so two writers never deadlock.
        let mut ids: Vec<i32> = (0..3).map(|_| fastrand::i32(1..=20)).collect();
        ids.sort_unstable();
        for id in ids {
            tx.execute(
                &format!("UPDATE {table} SET n = n + 1 WHERE id = $1"),
                &[&id],
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        changes += 4;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..60))).await;
    }
    changes
}

/// Ids of the rows `write_large` inserts in a savepoint it rolls back.
const ROLLED_BACK_IDS: i32 = 50_000_000;

/// Writes `transactions` large transactions: 1,500 new rows, then a
/// savepoint of 500 rows and 3 increments rolled back, then 3 increments
/// of random rows among 1..=20; returns how many changes committed.
async fn write_large(
    pool: outbox_pg::deadpool_postgres::Pool,
    table: String,
    transactions: i32,
) -> usize {
    let client = pool.get().await.unwrap();
    let mut changes = 0;
    for t in 0..transactions {
        let first = 10_000_000 + t * 10_000;
        let rolled_back = ROLLED_BACK_IDS + t * 10_000;
        // Rows locked in id order, so writers never deadlock.
        let mut ids: Vec<i32> = (0..3).map(|_| fastrand::i32(1..=20)).collect();
        ids.sort_unstable();
        let increments: String = ids
            .iter()
            .map(|id| format!("UPDATE {table} SET n = n + 1 WHERE id = {id};"))
            .collect();
        client
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO {table} SELECT g, 0 FROM generate_series({first}, {}) g;
                 SAVEPOINT s;
                 INSERT INTO {table} SELECT g, 0 FROM generate_series({rolled_back}, {}) g;
                 {increments}
                 ROLLBACK TO SAVEPOINT s;
                 {increments}
                 COMMIT;",
                first + 1499,
                rolled_back + 499
            ))
            .await
            .unwrap();
        changes += 1500 + 3;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..300))).await;
    }
    changes
}

/// Invariant (no loss, no duplicate effect, commit order per key): the
/// relay is SIGKILLed at random points while two writers commit changes,
/// once it published its initial load of the 20 rows the table already
/// held (a load cut short is `outbox-pg`'s `a_load_cut_after_some_chunks_resumes_after_them`);
/// most kills land between the broker's acknowledgement and the status
/// update that confirms it. Every loaded row and committed
/// change reaches Kafka, each key's changes first appear in commit order
/// (`n` counts up by one per update of a row), and ClickHouse ends with
/// each once: plain `count()` = `uniqExact(event_id)` = rows + changes.
#[tokio::test]
async fn wal_relay_killed_at_random_points_loses_and_doubles_nothing() {
    killed_at_random_points(unique("wal_kill"), &[], 0).await;
}

/// Invariant: the same as `wal_relay_killed_at_random_points_loses_and_doubles_nothing`
/// while a third writer commits large transactions (1,500 rows each, and a
/// savepoint of 500 rows and 3 updates rolled back) that the server
/// streams while they run (the relay's session sets
/// `logical_decoding_work_mem` to 64 kB) and the relay spills past 64 KiB:
/// kills land in the middle of streamed transactions, which the next
/// relay receives again from their start. Nothing rolled back appears.
#[tokio::test]
async fn wal_relay_killed_while_large_transactions_stream_loses_and_doubles_nothing() {
    let name = unique("wal_killstream");
    let streamed = killed_at_random_points(
        name,
        &[
            "--wal-decoding-work-mem-kb",
            "64",
            "--wal-in-progress-memory",
            "65536",
        ],
        25,
    )
    .await;
    assert!(streamed > 0, "the server streamed no transaction");
}

/// The kill test of `wal_relay_killed_at_random_points_loses_and_doubles_nothing`,
/// with the relay's `extra` options and `large` transactions of a third
/// writer; returns how many transactions the server streamed in progress.
async fn killed_at_random_points(name: String, extra: &[&str], large: i32) -> i64 {
    let pipeline = WalPipeline::new(&name).await;
    let mut relay = pipeline.relay_with(extra);
    pipeline.wait_streaming().await;
    pipeline.wait_loaded().await;
    let mut writers = vec![
        tokio::spawn(write(pipeline.pool.clone(), name.clone(), 1000, 150)),
        tokio::spawn(write(pipeline.pool.clone(), name.clone(), 5000, 150)),
    ];
    if large > 0 {
        writers.push(tokio::spawn(write_large(
            pipeline.pool.clone(),
            name.clone(),
            large,
        )));
    }
    let mut kills = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(200..900))).await;
        relay.0.kill().unwrap(); // SIGKILL
        relay.0.wait().unwrap();
        kills += 1;
        relay = pipeline.relay_with(extra);
    }
    // The 20 rows the table held when the slot was created come first, loaded.
    let mut committed = 20;
    for writer in writers {
        committed += writer.await.unwrap();
    }
    let read = read_topic(&brokers(), &name, committed, Duration::from_secs(3)).await;
    let status = terminate(&mut relay.0, Duration::from_secs(20));
    let (in_kafka, distinct_in_kafka, _) = count_ids(read.iter().filter_map(|r| r.event_id));

    // Per key, the first copy of each change in partition order: an
    // update's n is the previous one's plus one.
    let mut by_position = read.clone();
    by_position.sort_by_key(|r| (r.partition, r.offset));
    let mut first = HashSet::new();
    let mut last_n: HashMap<String, i64> = HashMap::new();
    let mut out_of_order = 0;
    let mut rolled_back = 0;
    for record in &by_position {
        if !first.insert(record.event_id) {
            continue;
        }
        let change: serde_json::Value = serde_json::from_str(&record.payload).unwrap();
        let n = change["after"]["n"].as_i64().unwrap();
        if change["after"]["id"]
            .as_i64()
            .is_some_and(|id| id >= i64::from(ROLLED_BACK_IDS))
        {
            rolled_back += 1;
        }
        let key = record.key.clone().unwrap_or_default();
        if let Some(previous) = last_n.insert(key, n) {
            if n != previous + 1 {
                out_of_order += 1;
            }
        }
    }

    let (ok, out) = consume_into_clickhouse(&name);
    assert!(ok, "{out}");
    let (rows, distinct) = ch_counts(&name).await;
    let streamed: i64 = pipeline
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT coalesce(max(stream_txns), 0) FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    println!(
        "committed={committed} relay_kills={kills} in_kafka={in_kafka} distinct_in_kafka={distinct_in_kafka} \
         copies={} out_of_order={out_of_order} rolled_back_seen={rolled_back} clickhouse_rows={rows} distinct={distinct} \
         lost={} streamed_in_progress={streamed}",
        in_kafka - distinct_in_kafka,
        committed.saturating_sub(distinct_in_kafka)
    );
    pipeline.cleanup().await;
    assert!(
        matches!(status, Some(s) if s.success()),
        "the relay stops cleanly on SIGTERM: {status:?}"
    );
    assert!(kills >= 3, "the writers outlived only {kills} kills");
    assert_eq!(
        distinct_in_kafka, committed,
        "every committed change reached Kafka once or more"
    );
    assert_eq!(out_of_order, 0, "each key's changes in commit order");
    assert_eq!(rolled_back, 0, "nothing rolled back is published");
    assert_eq!((rows, distinct), (committed as u64, committed as u64));
    streamed
}

/// Invariant (a load survives kill -9): the relay binary is SIGKILLed at
/// random points while it loads a 30,000-row table and a writer updates,
/// inserts and deletes rows of it; each restart goes on with the load after
/// its last acknowledged chunk. In Kafka, the first copy of each event, in
/// partition order (one key, one partition): every key's `n` never goes
/// back, nothing follows a key's delete, and the events replay to exactly
/// the table's rows at the end. Rows loaded more than once (read again
/// after a kill) are counted and printed.
#[tokio::test]
async fn a_relay_killed_during_its_initial_load_resumes_it() {
    let name = unique("wal_loadkill");
    let pipeline = WalPipeline::with_table(
        &name,
        &format!(
            "CREATE TABLE {name} (id int PRIMARY KEY, n int NOT NULL);
             INSERT INTO {name} SELECT g, 0 FROM generate_series(1, 30000) g;"
        ),
    )
    .await;
    // 60 chunks: room for every kill below on a fast machine.
    let load_batch = ["--wal-load-batch", "500"];
    let mut relay = pipeline.relay_with(&load_batch);
    pipeline.wait_streaming().await;
    let writer = {
        let pool = pipeline.pool.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let client = pool.get().await.unwrap();
            let mut changes = 0usize;
            for i in 0..600 {
                let id = fastrand::i32(1..=30_000);
                client
                    .batch_execute(&format!(
                        "UPDATE {name} SET n = n + 1 WHERE id = {id};
                         INSERT INTO {name} VALUES ({}, 0);
                         DELETE FROM {name} WHERE id = {};",
                        100_000 + i,
                        30_000 - i
                    ))
                    .await
                    .unwrap();
                changes += 3;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            changes
        })
    };
    let client = pipeline.pool.get().await.unwrap();
    let loaded = || async {
        client
            .query_opt(
                "SELECT loaded FROM outbox_wal_progress WHERE slot = $1",
                &[&name],
            )
            .await
            .unwrap()
            .is_some_and(|row| row.get::<_, bool>(0))
    };
    let position = || async {
        client
            .query_one(
                "SELECT coalesce(load_state::text, '-') FROM outbox_wal_progress WHERE slot = $1",
                &[&name],
            )
            .await
            .map(|row| row.get::<_, String>(0))
            .unwrap_or_default()
    };
    // Each kill waits for progress, not for a time: the relay (the first,
    // or the one started after the last kill) must have recorded a chunk
    // the previous one had not, then a random moment of the next chunks
    // passes. Timed kills let a fast machine load the table between two
    // of them (CI once did, with 1 kill).
    let mut kills = 0;
    let mut positions = Vec::new();
    let mut seen = position().await;
    while kills < 6 && !loaded().await {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while position().await == seen && !loaded().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay recorded no chunk after {seen} for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
        if loaded().await {
            break;
        }
        relay.0.kill().unwrap(); // SIGKILL
        relay.0.wait().unwrap();
        kills += 1;
        seen = position().await;
        positions.push(seen.clone());
        relay = pipeline.relay_with(&load_batch);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !loaded().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the load never finished: {}",
            position().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("recorded load positions at the kills: {positions:?}");
    let changes = writer.await.unwrap();
    let expected = 30_000 + changes - 600;
    let read = read_topic(&brokers(), &name, expected, Duration::from_secs(5)).await;
    let status = terminate(&mut relay.0, Duration::from_secs(20));
    let table: HashMap<i64, i64> = client
        .query(&format!("SELECT id::int8, n::int8 FROM {name}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();

    let mut by_position = read.clone();
    by_position.sort_by_key(|r| (r.partition, r.offset));
    let mut first = HashSet::new();
    let mut state: HashMap<i64, i64> = HashMap::new();
    let mut deleted: HashSet<i64> = HashSet::new();
    let mut violations = Vec::new();
    let mut loaded_rows: HashMap<i64, usize> = HashMap::new();
    for record in &by_position {
        if !first.insert(record.event_id) {
            continue;
        }
        let change: serde_json::Value = serde_json::from_str(&record.payload).unwrap();
        let op = change["op"].as_str().unwrap_or_default();
        if op == "d" {
            let id = change["before"]["id"].as_i64().unwrap();
            state.remove(&id);
            deleted.insert(id);
            continue;
        }
        let id = change["after"]["id"].as_i64().unwrap();
        let n = change["after"]["n"].as_i64().unwrap();
        if op == "r" {
            *loaded_rows.entry(id).or_default() += 1;
        }
        if deleted.contains(&id) {
            violations.push(format!("{op} of id {id} after its delete"));
        }
        if let Some(previous) = state.insert(id, n) {
            if n < previous {
                violations.push(format!("id {id}: {op} with n {n} after {previous}"));
            }
        }
    }
    let loaded_again = loaded_rows.values().filter(|c| **c > 1).count();
    let (in_kafka, distinct, _) = count_ids(read.iter().filter_map(|r| r.event_id));
    println!(
        "rows=30000 changes={changes} relay_kills_during_the_load={kills} in_kafka={in_kafka} distinct={distinct} \
         rows_loaded={} rows_loaded_more_than_once={loaded_again} order_violations={} final_rows={} replayed_rows={}",
        loaded_rows.len(),
        violations.len(),
        table.len(),
        state.len()
    );
    pipeline.cleanup().await;
    assert!(
        matches!(status, Some(s) if s.success()),
        "the relay stops cleanly on SIGTERM: {status:?}"
    );
    assert!(kills >= 4, "the load outlived only {kills} kills");
    assert!(
        violations.is_empty(),
        "{:?}",
        &violations[..violations.len().min(10)]
    );
    assert_eq!(state, table, "the first copies replay to the table");
}

/// Invariant: `outbox create-wal-slot` makes the slot before any service
/// emits (idempotent: a second run keeps its position), and `outbox status`
/// shows it with its positions.
#[tokio::test]
async fn the_outbox_command_creates_and_shows_the_wal_slot() {
    let name = unique("wal_cmd");
    let args = [
        "create-wal-slot",
        "--wal-slot",
        &name,
        "--wal-publication",
        &name,
        "--wal-messages-only",
    ];
    let first = command("outbox").args(args).output().unwrap();
    let second = command("outbox").args(args).output().unwrap();
    let status = command("outbox").arg("status").output().unwrap();
    let pool = pg().create_pool().unwrap();
    let client = pool.get().await.unwrap();
    test_support::drop_slot(&client, &name).await.unwrap();
    let _ = client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {name};
             DELETE FROM outbox_wal_progress WHERE slot = '{name}';"
        ))
        .await;
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    println!("{}{}", text(&first), text(&second));
    assert!(
        first.status.success() && second.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        text(&first),
        text(&second),
        "the second run keeps the slot where it was"
    );
    let line = text(&status)
        .lines()
        .find(|l| l.trim_start().starts_with(&name))
        .map(str::to_string);
    println!("{line:?}");
    assert!(
        line.is_some_and(|l| l.contains("reserved")),
        "{}",
        text(&status)
    );
}

/// Invariant: `outbox create-wal-slot` can make a slot whose tables are
/// still to load (the first relay that streams it loads them), and while a
/// load is cut short `outbox status` says where it will go on.
#[tokio::test]
async fn the_outbox_command_creates_a_slot_to_load_and_shows_where_the_load_is() {
    let name = unique("wal_cmdload");
    let pipeline = WalPipeline::with_table(
        &name,
        &format!(
            "CREATE TABLE {name} (id int PRIMARY KEY, n int NOT NULL);
             INSERT INTO {name} SELECT g, 0 FROM generate_series(1, 200000) g;"
        ),
    )
    .await;
    let table = format!("public.{name}={name}");
    let created = command("outbox")
        .args([
            "create-wal-slot",
            "--wal-slot",
            &name,
            "--wal-publication",
            &name,
        ])
        .args(["--wal-table", &table])
        .output()
        .unwrap();
    let before = command("outbox").arg("status").output().unwrap();
    // A relay that publishes part of the load, then dies.
    let mut relay = pipeline.relay();
    let client = pipeline.pool.get().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut state = None;
    while state.is_none() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        state = client
            .query_opt(
                "SELECT load_state::text FROM outbox_wal_progress WHERE slot = $1 AND NOT loaded",
                &[&name],
            )
            .await
            .unwrap()
            .and_then(|row| row.get::<_, Option<String>>(0));
    }
    relay.0.kill().unwrap(); // SIGKILL
    relay.0.wait().unwrap();
    let during = command("outbox").arg("status").output().unwrap();
    pipeline.cleanup().await;
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let line = |o: &std::process::Output| {
        text(o)
            .lines()
            .find(|l| l.trim_start().starts_with(&name))
            .map(str::to_string)
            .unwrap_or_default()
    };
    println!(
        "created: {}before: {}\nduring: {}\nrecorded: {state:?}",
        text(&created),
        line(&before),
        line(&during)
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert!(
        line(&before).trim_end().ends_with("false"),
        "{}",
        text(&before)
    );
    assert!(state.is_some(), "the relay recorded no chunk of the load");
    assert!(
        line(&during).contains(&format!("false: at public.{name} after [")),
        "{}",
        text(&during)
    );
}

/// Invariant (bounded takeover, and a stalled relay confirms nothing): the
/// relay streaming the slot is SIGSTOPped for longer than the server's
/// `wal_sender_timeout` while a writer commits; a waiting relay takes the
/// slot over; the stopped one is woken. Every change reaches Kafka and
/// ClickHouse once, and a relay started afterwards streams the slot (the
/// woken relay's late position must not make the slot look re-created).
#[tokio::test]
async fn a_relay_woken_after_a_takeover_confirms_nothing() {
    let name = unique("wal_stop");
    let pipeline = WalPipeline::new(&name).await;
    let first = pipeline.relay();
    pipeline.wait_streaming().await;
    pipeline.wait_loaded().await;
    let second = pipeline.relay();
    // Waiting relays check the slot against its record at every try (once a
    // second): one that finds the record behind stops, taking the slot for
    // one created again.
    let mut standby = pipeline.relay();
    let writer = tokio::spawn(write(pipeline.pool.clone(), name.clone(), 1000, 400));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = first.0.id().to_string();
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(stopped.success());
    let stopped_at = std::time::Instant::now();
    // The server ends the stopped relay's session after wal_sender_timeout
    // (10 s on the stack); the waiting relay takes the slot then.
    tokio::time::sleep(Duration::from_secs(14)).await;
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    println!(
        "woke the first relay after {:.1} s",
        stopped_at.elapsed().as_secs_f64()
    );
    let committed = 20 + writer.await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let standby_running = standby.0.try_wait().unwrap().is_none();
    drop(first);
    drop(second);
    drop(standby);
    // A relay of a later deployment: it must stream, not stop on the slot.
    let mut third = pipeline.relay();
    let read = read_topic(&brokers(), &name, committed, Duration::from_secs(3)).await;
    let (in_kafka, distinct_in_kafka, _) = count_ids(read.iter().filter_map(|r| r.event_id));
    let third_running = third.0.try_wait().unwrap().is_none();
    let status = terminate(&mut third.0, Duration::from_secs(20));
    let (consumed, out) = consume_into_clickhouse(&name);
    let (rows, distinct) = ch_counts(&name).await;
    println!(
        "committed={committed} in_kafka={in_kafka} distinct_in_kafka={distinct_in_kafka} \
         clickhouse_rows={rows} distinct={distinct} standby_running={standby_running} later_relay_running={third_running} later_relay_exit={status:?}"
    );
    pipeline.cleanup().await;
    assert!(consumed, "{out}");
    assert!(standby_running, "a waiting relay stopped");
    assert!(third_running, "the later relay stopped: {status:?}");
    assert!(
        matches!(status, Some(s) if s.success()),
        "the later relay: {status:?}"
    );
    assert_eq!(distinct_in_kafka, committed);
    assert_eq!((rows, distinct), (committed as u64, committed as u64));
}

/// The table's rows as text, one line per row, ordered by id: what the
/// state table must converge to.
async fn pg_state(pool: &outbox_pg::deadpool_postgres::Pool, table: &str) -> String {
    let client = pool.get().await.unwrap();
    let rows = client
        .query(
            &format!(
                "SELECT id::text || E'\\t' || name || E'\\t' || coalesce(amount::text, '\\N') || E'\\t' \
                   || array_to_string(tags, ',') || E'\\t' || floor(extract(epoch FROM updated))::bigint::text \
                 FROM {table} ORDER BY id"
            ),
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Invariant (state converges): a ClickHouse state table fed by the WAL
/// source through Kafka, read with `FINAL` and without deleted rows, holds
/// exactly PostgreSQL's rows, key by key, after an initial load, inserts,
/// updates (several of one row in one transaction, and in quick
/// succession), updates of the primary key, deletes and re-inserts of
/// deleted keys, with the consumer killed with SIGKILL in the middle.
#[tokio::test]
async fn a_state_table_converges_to_the_postgres_rows() {
    let name = unique("wal_state");
    let pipeline = WalPipeline::with_table(
        &name,
        &format!(
            "CREATE TABLE {name} (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12, 2),
                                  tags text[] NOT NULL DEFAULT '{{}}', updated timestamptz NOT NULL);
             INSERT INTO {name} SELECT g, 'loaded' || g, g * 1.5, ARRAY['a', 'b' || g],
                 timestamptz '2026-12-05 10:00:00+00' FROM generate_series(1, 100) g;"
        ),
    )
    .await;
    ch_query(&format!(
        "CREATE TABLE `{name}` (id Int64, name String, amount Nullable(Decimal(12, 2)), \
           tags Array(String), updated DateTime, _version UInt64, _deleted UInt8, _op String, \
           event_id UUID, kafka_partition Int32, kafka_offset Int64, ingested_at DateTime) \
         ENGINE = ReplacingMergeTree(_version) ORDER BY id"
    ))
    .await;
    let relay = pipeline.relay();
    pipeline.wait_streaming().await;
    let group = unique("group");
    let consumer = || {
        command("consumer_to_clickhouse")
            .args(["--topic", &name, "--clickhouse-table", &name])
            .args([
                "--group-id",
                &group,
                "--format",
                "table",
                "--changes",
                "state",
            ])
            .args(["--session-timeout-ms", "6000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = consumer();
    let client = pipeline.pool.get().await.unwrap();
    let run = |sql: String| {
        let client = &client;
        async move { client.batch_execute(&sql).await.unwrap() }
    };
    let mut statements = 0;
    for batch in 0..10 {
        let from = 101 + batch * 20;
        run(format!(
            "INSERT INTO {name} SELECT g, 'new' || g, NULL, '{{}}', now() FROM generate_series({from}, {}) g",
            from + 19
        ))
        .await;
        statements += 1;
    }
    // Three updates of one row in one transaction, and updates of many rows.
    run(format!(
        "BEGIN;
         UPDATE {name} SET name = 'first', amount = 1 WHERE id = 7;
         UPDATE {name} SET name = 'second', amount = 2 WHERE id = 7;
         UPDATE {name} SET name = 'third', tags = ARRAY['x', 'y'] WHERE id = 7;
         COMMIT;"
    ))
    .await;
    first.kill().unwrap(); // SIGKILL, mid-stream
    first.wait().unwrap();
    let mut last = consumer();
    for round in 0..5 {
        run(format!(
            "UPDATE {name} SET amount = coalesce(amount, 0) + {round}.25, name = name || '+', \
               updated = timestamptz '2026-12-05 11:00:00+00' + interval '{round} minutes' \
             WHERE id % 7 = {round}"
        ))
        .await;
        statements += 1;
    }
    run(format!("DELETE FROM {name} WHERE id % 5 = 0")).await;
    run(format!(
        "INSERT INTO {name} SELECT g, 'again' || g, 9.99, ARRAY['re'], now() \
         FROM generate_series(10, 100, 10) g"
    ))
    .await;
    run(format!("UPDATE {name} SET name = 'quick1' WHERE id = 3")).await;
    run(format!("UPDATE {name} SET name = 'quick2' WHERE id = 3")).await;
    run(format!("DELETE FROM {name} WHERE id = 4")).await;
    // Updates of the key: the old key's row must go.
    run(format!(
        "UPDATE {name} SET id = id + 10000 WHERE id IN (11, 12)"
    ))
    .await;
    run(format!(
        "UPDATE {name} SET id = 13000, name = 'moved' WHERE id = 13"
    ))
    .await;

    let expected = pg_state(&pipeline.pool, &name).await;
    let state_sql = format!(
        "SELECT id, name, toString(amount), arrayStringConcat(tags, ','), toUnixTimestamp(updated) \
         FROM `{name}` FINAL WHERE _deleted = 0 ORDER BY id FORMAT TabSeparated"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut state = String::new();
    while tokio::time::Instant::now() < deadline {
        state = ch_query(&state_sql).await;
        if state == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = terminate(&mut last, Duration::from_secs(20));
    drop(relay);
    assert_eq!(state, expected, "the state before the replay");
    // Merge old versions away, then replay the whole topic with a new group,
    // as after a lost Kafka commit: the sink finds no position of a merged
    // row and writes its change again, older than the row that replaced it.
    // Only the version keeps the state right (the last insert would not).
    ch_query(&format!("OPTIMIZE TABLE `{name}` FINAL")).await;
    let merged = ch_query(&format!("SELECT count() FROM `{name}` FORMAT TabSeparated")).await;
    let replay = command("consumer_to_clickhouse")
        .args(["--topic", &name, "--clickhouse-table", &name])
        .args([
            "--group-id",
            &unique("replay"),
            "--format",
            "table",
            "--changes",
            "state",
        ])
        .args([
            "--exit-after-idle-secs",
            "4",
            "--session-timeout-ms",
            "6000",
        ])
        .output()
        .unwrap();
    let replayed = String::from_utf8_lossy(&replay.stdout).into_owned();
    let state = ch_query(&state_sql).await;
    let counts = ch_query(&format!(
        "SELECT count(), uniqExact(event_id), countIf(_op = 'r'), countIf(_deleted = 1) \
         FROM `{name}` FORMAT TabSeparated"
    ))
    .await;
    let expected_rows = expected.lines().count();
    let differing: Vec<(&str, &str)> = expected
        .lines()
        .zip(state.lines())
        .filter(|(a, b)| a != b)
        .take(5)
        .collect();
    println!(
        "postgres rows={expected_rows} state rows={} (rows, distinct events, loaded, deletes in the table: {counts}); \
         rows after the merge={merged}; replay: {}; first differences after the replay: {differing:?}",
        state.lines().count(),
        replayed.trim()
    );
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    pipeline.cleanup().await;
    assert!(matches!(status, Some(s) if s.success()), "{status:?}");
    assert_eq!(state.lines().count(), expected_rows);
    assert!(differing.is_empty(), "{differing:?}");
    assert_eq!(state, expected);
    assert!(statements > 0);
}
