//! The WAL source against the real PostgreSQL (with `wal_level = logical`,
//! as `scripts/stack.sh` runs it). Each test has its own table, slot,
//! publication and progress row, dropped at the start and the end.

use std::time::Duration;

use outbox_core::{Delivery, Event, Source};
use outbox_pg::wal::{change_event_id, CaptureTable, WalConfig, WalSource};
use outbox_pg::{Outbox, OutboxConfig, PgError};
use serde_json::Value;

use super::common::{ack, pg_config, setup};

struct Capture {
    pool: deadpool_postgres::Pool,
    config: WalConfig,
    table: String,
    dead: String,
}

impl Capture {
    /// Table `w_<name>` (id int primary key, owner text, amount numeric,
    /// note text), captured by slot and publication `w_<name>`.
    async fn new(name: &str) -> Capture {
        // RUST_LOG=outbox_pg=debug shows the reader's sessions.
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let (pool, _) = setup(&format!("w_{name}")).await;
        let table = format!("w_{name}_rows");
        let config = WalConfig {
            slot: format!("w_{name}"),
            publication: format!("w_{name}"),
            tables: vec![CaptureTable::new(table.clone()).with_topic(format!("topic_{name}"))],
            progress_table: format!("w_{name}_progress"),
            // Logical messages reach every slot of the database: each
            // test's events under a prefix of its own.
            message_prefix: format!("outbox_{name}"),
            status_interval: Duration::from_millis(100),
            standby_retry: Duration::from_millis(100),
            ..WalConfig::default()
        };
        let capture = Capture {
            pool,
            config,
            table,
            dead: format!("t_w_{name}_dead"),
        };
        capture.drop_all().await;
        capture
            .sql(&format!(
                "CREATE TABLE {t} (id int PRIMARY KEY, owner text NOT NULL, amount numeric, note text);
                 -- Long notes are stored out of line uncompressed: an update that leaves one alone does not send it.
                 ALTER TABLE {t} ALTER COLUMN note SET STORAGE EXTERNAL;",
                t = capture.table
            ))
            .await;
        capture
    }

    async fn sql(&self, sql: &str) {
        let client = self.pool.get().await.unwrap();
        client.batch_execute(sql).await.unwrap();
    }

    async fn drop_all(&self) {
        let client = self.pool.get().await.unwrap();
        // The slot goes first: a session may still hold it for a moment.
        test_support::drop_slot(&client, &self.config.slot)
            .await
            .unwrap();
        client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {pubname}; DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {progress};",
                pubname = self.config.publication,
                table = self.table,
                progress = self.config.progress_table,
            ))
            .await
            .unwrap();
    }

    fn source(&self) -> WalSource {
        WalSource::start(
            &pg_config(),
            self.pool.clone(),
            self.config.clone(),
            &self.dead,
        )
        .unwrap()
    }

    /// Claims until `count` events are in hand (or 20 s passed).
    async fn claim(
        &self,
        source: &WalSource,
        count: usize,
    ) -> (
        Vec<Event>,
        Vec<outbox_core::Claimed<outbox_pg::wal::WalClaim>>,
    ) {
        let mut events = Vec::new();
        let mut claims = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while events.len() < count && tokio::time::Instant::now() < deadline {
            match source.claim(count - events.len()).await.unwrap() {
                Some(claimed) => {
                    events.extend(claimed.events.iter().cloned());
                    claims.push(claimed);
                }
                None => source
                    .wait_for_events(Duration::from_millis(200))
                    .await
                    .unwrap(),
            }
        }
        (events, claims)
    }

    async fn slot_confirmed(&self) -> String {
        let client = self.pool.get().await.unwrap();
        client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.config.slot],
            )
            .await
            .unwrap()
            .get(0)
    }
}

fn body(event: &Event) -> Value {
    serde_json::from_slice(&event.payload).unwrap()
}

async fn acknowledge_all(
    source: &WalSource,
    claims: Vec<outbox_core::Claimed<outbox_pg::wal::WalClaim>>,
) {
    for claimed in claims {
        let deliveries: Vec<Delivery> = (0..claimed.events.len()).map(|i| ack(i as i64)).collect();
        source.acknowledge(claimed, &deliveries).await.unwrap();
    }
}

/// Invariant: every committed insert, update and delete of a captured table
/// comes out once, in commit order, as the documented envelope; a rolled
/// back one never does; and a change read again (after a relay that
/// acknowledged nothing) carries the same id.
#[tokio::test]
async fn table_changes_come_out_in_commit_order_with_ids_that_survive_a_reread() {
    let capture = Capture::new("changes").await;
    let source = capture.source();
    // Nothing before the slot exists is captured: wait for it.
    wait_for_slot(&capture).await;
    settle_load(&capture, &source).await;
    let t = &capture.table;
    // One call each: in one simple query, a BEGIN would take the statements before it into its transaction.
    for sql in [
        format!("INSERT INTO {t} VALUES (1, 'alice', 12345678901234567890.123456789, repeat('x', 5000))"),
        format!("BEGIN; INSERT INTO {t} VALUES (2, 'bob', NULL, NULL); ROLLBACK"),
        format!("BEGIN; UPDATE {t} SET owner = 'alice2' WHERE id = 1; INSERT INTO {t} VALUES (3, 'carol', 1, 'n'); COMMIT"),
        format!("DELETE FROM {t} WHERE id = 3"),
    ] {
        capture.sql(&sql).await;
    }
    let (events, claims) = capture.claim(&source, 4).await;
    let ops: Vec<(String, Value)> = events
        .iter()
        .map(|e| {
            (
                body(e)["op"].as_str().unwrap_or("?").to_string(),
                body(e)["after"]["id"].clone(),
            )
        })
        .collect();
    println!("changes: {ops:?}");
    assert_eq!(
        events.len(),
        4,
        "4 committed changes, none rolled back: {ops:?}"
    );
    let first = body(&events[0]);
    assert_eq!(first["op"], "c");
    assert_eq!(
        first["after"]["amount"], "12345678901234567890.123456789",
        "numeric stays exact"
    );
    assert_eq!(first["after"]["note"].as_str().map(str::len), Some(5000));
    assert_eq!(first["source"]["table"], capture.table.as_str());
    assert_eq!(events[0].topic, "topic_changes");
    assert_eq!(events[0].key.as_deref(), Some(&b"1"[..]));
    let update = body(&events[1]);
    assert_eq!(update["op"], "u");
    assert_eq!(update["after"]["owner"], "alice2");
    // The untouched 5,000-byte note is TOASTed: not sent, and not null.
    assert!(update["after"].get("note").is_none(), "{update}");
    assert_eq!(update["unchanged_toast"], serde_json::json!(["note"]));
    assert_eq!(body(&events[2])["op"], "c");
    assert_eq!(
        body(&events[1])["source"]["lsn"],
        body(&events[2])["source"]["lsn"],
        "one transaction"
    );
    let delete = body(&events[3]);
    assert_eq!(
        (delete["op"].as_str(), delete["before"]["id"].as_i64()),
        (Some("d"), Some(3))
    );
    assert_eq!(events[3].key.as_deref(), Some(&b"3"[..]));
    // A relay that acknowledged nothing and went away: the next reads the
    // same changes with the same ids.
    drop(claims);
    drop(source);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let source = capture.source();
    let (again, claims) = capture.claim(&source, 4).await;
    let ids = |e: &[Event]| e.iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(
        ids(&again),
        ids(&events),
        "a change read again keeps its id"
    );
    acknowledge_all(&source, claims).await;
    // The end of the last transaction may arrive after its last change was
    // claimed: the next claim takes it (and says nothing is pending).
    while let Some(claimed) = source.claim(10).await.unwrap() {
        acknowledge_all(&source, vec![claimed]).await;
    }
    // Acknowledged: the slot moves past them, and a new reader sees only new changes.
    let before = capture.slot_confirmed().await;
    let target = outbox_pg::wal::lsn_text(source.confirmed());
    let reached = || async {
        let client = capture.pool.get().await.unwrap();
        client
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&capture.config.slot, &target],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !reached().await && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "slot confirmed {before} -> {} (source: {target})",
        capture.slot_confirmed().await
    );
    // At or past it: a busy server's keepalives move an idle slot further.
    assert!(reached().await, "the server has what the source confirmed");
    drop(source);
    tokio::time::sleep(Duration::from_millis(300)).await;
    capture
        .sql(&format!("INSERT INTO {t} VALUES (4, 'dave', 4, 'd')"))
        .await;
    let source = capture.source();
    let (after, claims) = capture.claim(&source, 1).await;
    assert_eq!(after.len(), 1);
    assert_eq!(
        body(&after[0])["after"]["id"],
        4,
        "only the change after the acknowledged ones"
    );
    acknowledge_all(&source, claims).await;
    drop(source);
    capture.drop_all().await;
}

/// Invariant: events of one key come out in commit order, even when the
/// transaction that wrote first commits last (the outbox table's `seq`
/// orders by insert instead).
#[tokio::test]
async fn crossing_writers_of_one_key_come_out_in_commit_order() {
    let capture = Capture::new("crossing").await;
    let source = capture.source();
    let (_, _) = capture.claim(&source, 0).await;
    wait_for_slot(&capture).await;
    settle_load(&capture, &source).await;
    let t = capture.table.clone();
    let pg = pg_config();
    let pool = pg.create_pool().unwrap();
    let mut first = pool.get().await.unwrap();
    let mut second = pool.get().await.unwrap();
    let outbox = Outbox::new(&OutboxConfig::default().validate().unwrap())
        .with_message_prefix(capture.config.message_prefix.clone());
    let tx1 = first.transaction().await.unwrap();
    let tx2 = second.transaction().await.unwrap();
    // The first to write…
    tx1.execute(
        &format!("INSERT INTO {t} VALUES (10, 'k', 1, 'first writer')"),
        &[],
    )
    .await
    .unwrap();
    outbox
        .emit(
            &tx1,
            &[Event::new("orders", "written first, committed last").with_key("k")],
        )
        .await
        .unwrap();
    tx2.execute(
        &format!("INSERT INTO {t} VALUES (11, 'k', 2, 'second writer')"),
        &[],
    )
    .await
    .unwrap();
    outbox
        .emit(
            &tx2,
            &[Event::new("orders", "written second, committed first").with_key("k")],
        )
        .await
        .unwrap();
    // …commits last.
    tx2.commit().await.unwrap();
    tx1.commit().await.unwrap();
    let (events, claims) = capture.claim(&source, 4).await;
    let order: Vec<String> = events
        .iter()
        .map(|e| match e.topic.as_str() {
            "orders" => String::from_utf8_lossy(&e.payload).into_owned(),
            _ => body(e)["after"]["note"].as_str().unwrap_or("?").to_string(),
        })
        .collect();
    println!("order out of the WAL: {order:?}");
    assert_eq!(
        order,
        [
            "second writer",
            "written second, committed first",
            "first writer",
            "written first, committed last"
        ],
        "commit order"
    );
    acknowledge_all(&source, claims).await;
    drop(source);
    capture.drop_all().await;
}

/// Claims and acknowledges until the initial load is recorded as done
/// (the tables of these tests are empty when their source starts).
async fn settle_load(capture: &Capture, source: &WalSource) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(claimed) = source.claim(100).await.unwrap() {
            acknowledge_all(source, vec![claimed]).await;
        }
        let client = capture.pool.get().await.unwrap();
        let loaded: Option<bool> = client
            .query_opt(
                &format!(
                    "SELECT loaded FROM {} WHERE slot = $1",
                    capture.config.progress_table
                ),
                &[&capture.config.slot],
            )
            .await
            .unwrap()
            .map(|row| row.get(0));
        if loaded == Some(true) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the initial load was never recorded"
        );
        source
            .wait_for_events(Duration::from_millis(50))
            .await
            .unwrap();
    }
}

async fn wait_for_slot(capture: &Capture) {
    let client = capture.pool.get().await.unwrap();
    for _ in 0..200 {
        let active: Option<bool> = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&capture.config.slot],
            )
            .await
            .unwrap()
            .map(|row| row.get(0));
        if active == Some(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the slot {} never became active", capture.config.slot);
}

/// Invariant: `Outbox::emit` events exist exactly when their transaction
/// commits, keep their own ids, headers and keys, and a message under the
/// prefix that is not an event is dead-lettered with its reason while the
/// events after it keep flowing.
#[tokio::test]
async fn emitted_events_are_atomic_with_their_transaction_and_poison_is_isolated() {
    let capture = Capture::new("emit").await;
    let source = capture.source();
    wait_for_slot(&capture).await;
    settle_load(&capture, &source).await;
    let outbox = Outbox::new(&OutboxConfig::default().validate().unwrap())
        .with_message_prefix(capture.config.message_prefix.clone());
    let mut client = capture.pool.get().await.unwrap();
    let kept = Event::new("orders", "kept")
        .with_key("k1")
        .with_header("trace", "abc");
    let lost = Event::new("orders", "rolled back").with_key("k1");
    let tx = client.transaction().await.unwrap();
    outbox.emit(&tx, std::slice::from_ref(&lost)).await.unwrap();
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    outbox.emit(&tx, std::slice::from_ref(&kept)).await.unwrap();
    tx.execute(
        "SELECT pg_logical_emit_message(true, $1, '\\x0102'::bytea)",
        &[&capture.config.message_prefix],
    )
    .await
    .unwrap();
    tx.execute(
        "SELECT pg_logical_emit_message(true, 'another-app', 'ignored')",
        &[],
    )
    .await
    .unwrap();
    let after = Event::new("orders", "after the poison").with_key("k2");
    outbox
        .emit(&tx, std::slice::from_ref(&after))
        .await
        .unwrap();
    let typed = outbox
        .emit_json(
            &tx,
            "orders",
            Some("k3"),
            &serde_json::json!({"n": 3}),
            &[("source", "typed")],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (events, claims) = capture.claim(&source, 3).await;
    assert_eq!(events.len(), 3);
    assert_eq!(events[2].id, typed);
    assert_eq!(&events[2].payload[..], br#"{"n":3}"#);
    assert_eq!(
        events[2].headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        (events[0].id, &events[0].payload[..]),
        (kept.id, &b"kept"[..])
    );
    assert_eq!(
        events[0].headers.get("trace").map(String::as_str),
        Some("abc")
    );
    assert_eq!(events[0].key, kept.key);
    assert_eq!(events[1].id, after.id);
    acknowledge_all(&source, claims).await;
    let dead: Vec<(String, String)> = client
        .query(&format!("SELECT reason, origin FROM {}", capture.dead), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    println!("dead letters: {dead:?}");
    assert_eq!(dead.len(), 1, "the one bad message");
    assert!(
        dead[0].0.contains("version 1 is not known") || dead[0].0.contains("truncated"),
        "{dead:?}"
    );
    assert_eq!(dead[0].1, "wal");
    drop(source);
    capture.drop_all().await;
}

/// Invariant: one session streams a slot; a second relay waits and takes
/// over when the first goes away, with nothing lost (what the first did not
/// acknowledge, the second publishes).
#[tokio::test]
async fn a_waiting_relay_takes_over_the_slot_when_the_first_goes_away() {
    let capture = Capture::new("takeover").await;
    let first = capture.source();
    wait_for_slot(&capture).await;
    settle_load(&capture, &first).await;
    let second = capture.source();
    let t = &capture.table;
    capture
        .sql(&format!(
            "INSERT INTO {t} VALUES (1, 'a', 1, 'x'), (2, 'b', 2, 'y')"
        ))
        .await;
    let (seen_by_first, claims) = capture.claim(&first, 2).await;
    assert_eq!(seen_by_first.len(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        second.claim(10).await.unwrap().is_none(),
        "the waiting relay reads nothing while the slot is held"
    );
    // The first dies with its batch unacknowledged.
    drop(claims);
    drop(first);
    let started = std::time::Instant::now();
    let (seen_by_second, claims) = capture.claim(&second, 2).await;
    println!("takeover after {} ms", started.elapsed().as_millis());
    assert_eq!(
        seen_by_second.iter().map(|e| e.id).collect::<Vec<_>>(),
        seen_by_first.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    acknowledge_all(&second, claims).await;
    drop(second);
    capture.drop_all().await;
}

/// Invariant: a slot dropped behind the pipeline's back is a loud,
/// permanent error naming the last confirmed position, never a silent
/// new start.
#[tokio::test]
async fn a_dropped_slot_is_a_permanent_error_that_says_what_may_be_missing() {
    let capture = Capture::new("dropped").await;
    let source = capture.source();
    wait_for_slot(&capture).await;
    settle_load(&capture, &source).await;
    drop(source);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = capture.pool.get().await.unwrap();
    test_support::drop_slot(&client, &capture.config.slot)
        .await
        .unwrap();
    let source = capture.source();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match source.claim(10).await {
            Err(err) => break err,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(_) => panic!("no error for a dropped slot"),
        }
    };
    let text = outbox_core::ErrorChain(&err).to_string();
    println!("{text}");
    assert!(!err.is_retryable());
    assert!(
        text.contains("was dropped") && text.contains("DELETE FROM"),
        "{text}"
    );
    drop(source);
    capture.drop_all().await;
}

#[test]
fn change_ids_depend_on_the_place_in_the_wal_only() {
    let a = change_event_id("1", 0x10, 0);
    assert_eq!(a, change_event_id("1", 0x10, 0));
    assert_ne!(a, change_event_id("1", 0x10, 1));
    assert_ne!(a, change_event_id("1", 0x11, 0));
    assert_ne!(a, change_event_id("2", 0x10, 0));
    let _ = PgError::Config(String::new());
}

/// Invariant: a capture whose tables are quiet pins no WAL while the rest
/// of the database writes without a pause (the server then sends no
/// keepalive of its own): the slot's confirmed position keeps following
/// the server's.
#[tokio::test]
async fn quiet_tables_on_a_busy_server_pin_no_wal() {
    let capture = Capture::new("quiet").await;
    let source = capture.source();
    wait_for_slot(&capture).await;
    settle_load(&capture, &source).await;
    let busy = format!("{}_busy", capture.table);
    capture
        .sql(&format!(
            "DROP TABLE IF EXISTS {busy}; CREATE TABLE {busy} (x text)"
        ))
        .await;
    let writer = {
        let pool = capture.pool.clone();
        let busy = busy.clone();
        tokio::spawn(async move {
            let client = pool.get().await.unwrap();
            let started = tokio::time::Instant::now();
            let mut written = 0u64;
            while started.elapsed() < Duration::from_secs(8) {
                client
                    .batch_execute(&format!(
                        "INSERT INTO {busy} SELECT repeat(md5(g::text), 30) FROM generate_series(1, 200) g"
                    ))
                    .await
                    .unwrap();
                written += 200;
                // About 4 MB of WAL a second: busy, not more than the
                // server's decoders (one per slot, on two cores) can read.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            written
        })
    };
    let client = capture.pool.get().await.unwrap();
    let mut worst_late = 0.0f64;
    let mut samples = 0;
    tokio::time::sleep(Duration::from_secs(3)).await;
    while !writer.is_finished() {
        let behind: f64 = client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&capture.config.slot],
            )
            .await
            .unwrap()
            .get(0);
        worst_late = worst_late.max(behind);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = writer.await.unwrap();
    println!("{rows} rows written elsewhere; WAL behind the slot, worst of {samples} samples after the first 3 s: {worst_late:.0} bytes");
    assert!(
        worst_late < 8.0 * 1024.0 * 1024.0,
        "the quiet capture pinned {worst_late:.0} bytes of WAL while the server was busy"
    );
    assert!(
        source.claim(10).await.unwrap().is_none(),
        "nothing of the busy table is captured"
    );
    drop(source);
    capture.sql(&format!("DROP TABLE {busy}")).await;
    capture.drop_all().await;
}

/// Replays `events` (loaded rows, then changes) onto a map id → owner, the
/// way a state table keyed by the primary key would end.
fn replay(events: &[Event]) -> std::collections::BTreeMap<i64, String> {
    let mut state = std::collections::BTreeMap::new();
    for event in events {
        let change = body(event);
        match change["op"].as_str() {
            Some("r" | "c" | "u") => {
                let row = &change["after"];
                state.insert(
                    row["id"].as_i64().unwrap(),
                    row["owner"].as_str().unwrap().to_string(),
                );
            }
            Some("d") => {
                state.remove(&change["before"]["id"].as_i64().unwrap());
            }
            other => panic!("unexpected op {other:?}"),
        }
    }
    state
}

/// The order violations in `events` for the writes of the load tests: per
/// id, a value older than one already seen (`before…` < `during{i}` by
/// `i`), or any event after the id's delete (a row the load resurrected).
fn history_violations(events: &[Event]) -> Vec<String> {
    let version = |owner: &str| -> i64 {
        owner
            .strip_prefix("during")
            .and_then(|i| i.parse::<i64>().ok())
            .map_or(-1, |i| i)
    };
    let mut last: std::collections::HashMap<i64, Option<i64>> = Default::default();
    let mut violations = Vec::new();
    for event in events {
        let change = body(event);
        let op = change["op"].as_str().unwrap_or_default().to_string();
        let row = if op == "d" {
            &change["before"]
        } else {
            &change["after"]
        };
        let id = row["id"].as_i64().unwrap();
        match (last.get(&id).copied(), op.as_str()) {
            (Some(None), _) => violations.push(format!("{op} of id {id} after its delete")),
            (_, "d") => {
                last.insert(id, None);
            }
            (seen, _) => {
                let now = version(row["owner"].as_str().unwrap());
                if let Some(Some(before)) = seen {
                    if now < before {
                        violations.push(format!("id {id}: {op} with version {now} after {before}"));
                    }
                }
                last.insert(id, Some(now));
            }
        }
    }
    violations
}

/// Writes while a load runs: updates of loaded rows (`during{i}`), new
/// rows, deletes.
fn write_during_the_load(
    pool: deadpool_postgres::Pool,
    t: String,
    rounds: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = pool.get().await.unwrap();
        for i in 0..rounds {
            client
                .batch_execute(&format!(
                    "UPDATE {t} SET owner = 'during{i}' WHERE id = {};
                     INSERT INTO {t} VALUES ({}, 'new{i}', 0, NULL);
                     DELETE FROM {t} WHERE id = {};",
                    1 + (i * 7) % 3000,
                    10_000 + i,
                    2000 + i,
                ))
                .await
                .unwrap();
        }
    })
}

/// Claims and acknowledges until `prior` and the events replay to the
/// table's rows once `writer` is done; returns the events.
async fn drain_until_the_table(
    capture: &Capture,
    source: &WalSource,
    writer: &tokio::task::JoinHandle<()>,
    prior: &[Event],
) -> (Vec<Event>, std::collections::BTreeMap<i64, String>) {
    let t = &capture.table;
    let mut events = prior.to_vec();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let client = capture.pool.get().await.unwrap();
    let mut table = std::collections::BTreeMap::new();
    let mut last_event = tokio::time::Instant::now();
    loop {
        match source.claim(1000).await.unwrap() {
            Some(claimed) => {
                events.extend(claimed.events.iter().cloned());
                acknowledge_all(source, vec![claimed]).await;
                last_event = tokio::time::Instant::now();
            }
            None => source
                .wait_for_events(Duration::from_millis(200))
                .await
                .unwrap(),
        }
        if writer.is_finished() {
            if table.is_empty() {
                // Every write committed: the rows the stream must end at.
                table = client
                    .query(&format!("SELECT id::int8, owner FROM {t}"), &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| (row.get::<_, i64>(0), row.get::<_, String>(1)))
                    .collect();
            }
            let done = source.load_progress().borrow().done;
            // Done, or nothing more comes: the caller's checks say why.
            if done && (replay(&events) == table || last_event.elapsed() > Duration::from_secs(3)) {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stuck at {} events, replaying to {} rows of {}",
            events.len(),
            replay(&events).len(),
            table.len()
        );
    }
    (events.split_off(prior.len()), table)
}

/// Invariant (initial load): the rows a table holds when its load starts
/// come out once each (`op` `r`), with writes running during the load, and
/// the changes come out as they commit: replayed in order, loaded rows and
/// changes give exactly the table's final rows, no key ever goes back to an
/// older value or comes back after its delete, no row is loaded twice, no
/// event comes twice. A load cut short (the relay went away with nothing
/// acknowledged) starts over, and the rows that did not change keep their
/// ids.
#[tokio::test]
async fn the_initial_load_meets_the_stream_without_a_gap_or_a_double() {
    let mut capture = Capture::new("load").await;
    capture.config.load_batch = 500;
    let t = capture.table.clone();
    capture
        .sql(&format!(
            "INSERT INTO {t} SELECT g, 'before' || g, g, NULL FROM generate_series(1, 3000) g"
        ))
        .await;
    // A relay that reads part of the load and goes away.
    let cut = capture.source();
    let (partial, claims) = capture.claim(&cut, 700).await;
    assert!(partial.iter().all(|e| body(e)["op"] == "r"));
    drop(claims);
    drop(cut);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let source = capture.source();
    let writer = write_during_the_load(capture.pool.clone(), t.clone(), 150);
    let (events, table) = drain_until_the_table(&capture, &source, &writer, &[]).await;
    writer.await.unwrap();
    // Anything extra would come now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let extra = source
        .claim(10)
        .await
        .unwrap()
        .map(|c| c.events.len())
        .unwrap_or(0);
    let loaded: Vec<&Event> = events.iter().filter(|e| body(e)["op"] == "r").collect();
    let distinct_loaded: std::collections::HashSet<i64> = loaded
        .iter()
        .map(|e| body(e)["after"]["id"].as_i64().unwrap())
        .collect();
    let progress = *source.load_progress().borrow();
    println!("load progress at the end: {progress:?}");
    let replayed = replay(&events);
    let violations = history_violations(&events);
    let same_ids = partial
        .iter()
        .filter(|p| loaded.iter().any(|l| l.id == p.id))
        .count();
    let interleaved = events
        .iter()
        .skip_while(|e| body(e)["op"] == "r")
        .filter(|e| body(e)["op"] == "r")
        .count();
    println!(
        "loaded={} distinct_loaded={} changes={} loaded_after_the_first_change={interleaved} extra={} \
         table_rows={} replayed_rows={} order_violations={} cut_load_rows={} \
         of_them_same_id_in_the_second_load={same_ids}",
        loaded.len(),
        distinct_loaded.len(),
        events.len() - loaded.len(),
        extra,
        table.len(),
        replayed.len(),
        violations.len(),
        partial.len(),
    );
    assert!(progress.done, "{progress:?}");
    assert_eq!(progress.rows, loaded.len() as u64, "{progress:?}");
    assert_eq!(loaded.len(), distinct_loaded.len(), "no row loaded twice");
    assert!(violations.is_empty(), "{violations:?}");
    let mut seen = std::collections::HashMap::new();
    for e in &events {
        *seen.entry(e.id).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), events.len(), "every event once");
    assert_eq!(extra, 0);
    assert_eq!(replayed, table, "load + changes = the table");
    assert!(
        same_ids > 0,
        "unchanged rows keep their ids across a load started over"
    );
    drop(source);
    capture.drop_all().await;
}

/// Invariant (a load resumes): a relay that published part of the load and
/// died goes on, in the next session, after the last chunk whose rows were
/// acknowledged: those rows are not read again, every other row is loaded
/// once, and with writes running the stream still ends at the table's rows
/// in key order of history.
#[tokio::test]
async fn a_load_cut_after_some_chunks_resumes_after_them() {
    let mut capture = Capture::new("resume").await;
    capture.config.load_batch = 400;
    let t = capture.table.clone();
    capture
        .sql(&format!(
            "INSERT INTO {t} SELECT g, 'before' || g, g, NULL FROM generate_series(1, 3000) g"
        ))
        .await;
    let first = capture.source();
    let (published, claims) = capture.claim(&first, 1300).await;
    acknowledge_all(&first, claims).await;
    // Settled: the progress row says how far (3 whole chunks of 400 and
    // part of a fourth were acknowledged: the load is after row 1,200).
    let client = capture.pool.get().await.unwrap();
    let state: String = client
        .query_one(
            &format!(
                "SELECT load_state::text FROM {} WHERE slot = $1",
                capture.config.progress_table
            ),
            &[&capture.config.slot],
        )
        .await
        .unwrap()
        .get(0);
    drop(first); // the relay dies (its claims are settled, its stream ends)
    tokio::time::sleep(Duration::from_millis(300)).await;

    let second = capture.source();
    let writer = write_during_the_load(capture.pool.clone(), t.clone(), 100);
    let (events, table) = drain_until_the_table(&capture, &second, &writer, &published).await;
    writer.await.unwrap();
    let first_ids: std::collections::HashSet<i64> = published
        .iter()
        .map(|e| body(e)["after"]["id"].as_i64().unwrap())
        .collect();
    let second_loaded: Vec<i64> = events
        .iter()
        .filter(|e| body(e)["op"] == "r")
        .map(|e| body(e)["after"]["id"].as_i64().unwrap())
        .collect();
    let again: Vec<&i64> = second_loaded
        .iter()
        .filter(|id| **id <= 1200 && first_ids.contains(id))
        .collect();
    let mut all: Vec<Event> = published.clone();
    all.extend(events.iter().cloned());
    let violations = history_violations(&all);
    println!(
        "state_after_the_first={state} first_published={} second_loaded={} read_again_of_the_first_1200={} \
         changes={} order_violations={}",
        published.len(),
        second_loaded.len(),
        again.len(),
        events.len() - second_loaded.len(),
        violations.len()
    );
    assert!(state.contains("\"after\": [\"1200\"]"), "{state}");
    assert!(
        again.is_empty(),
        "rows of acknowledged chunks loaded again: {again:?}"
    );
    assert!(
        second_loaded.len() < 3000 - 1000,
        "the second session read from the start: {} rows",
        second_loaded.len()
    );
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(replay(&all), table, "both sessions' events = the table");
    drop(second);
    capture.drop_all().await;
}

/// Invariant (the outbox table read from the WAL): every committed insert
/// into the outbox table is published as the event it holds (its id,
/// topic, key, payload, headers), once, in commit order; rows retired in
/// the writer's transaction (`enqueue_and_delete`) leave the table empty
/// and are published all the same; a rolled-back insert never is.
#[tokio::test]
async fn outbox_table_inserts_stream_from_the_wal_and_retire_in_their_transaction() {
    let mut capture = Capture::new("outboxwal").await;
    let table = "t_w_outboxwal".to_string();
    capture.config.tables = Vec::new();
    capture.config.outbox_tables = vec![table.clone()];
    let source = capture.source();
    wait_for_slot(&capture).await;
    settle_load(&capture, &source).await;
    let outbox = Outbox::new(
        &OutboxConfig {
            table: table.clone(),
            dead_letter_table: capture.dead.clone(),
            ..OutboxConfig::default()
        }
        .validate()
        .unwrap(),
    );
    let mut client = capture.pool.get().await.unwrap();
    let retired = [
        Event::new("orders", "first")
            .with_key("k1")
            .with_header("trace", "t1"),
        Event::new("orders", "second").with_key("k2"),
    ];
    let kept = Event::new("payments", "kept in the table");
    let rolled_back = Event::new("orders", "rolled back").with_key("k1");
    let tx = client.transaction().await.unwrap();
    outbox.enqueue_and_delete(&tx, &retired).await.unwrap();
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    outbox
        .enqueue_and_delete(&tx, std::slice::from_ref(&rolled_back))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    outbox
        .enqueue(&tx, std::slice::from_ref(&kept))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (events, claims) = capture.claim(&source, 3).await;
    acknowledge_all(&source, claims).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let extra = source
        .claim(10)
        .await
        .unwrap()
        .map(|c| c.events.len())
        .unwrap_or(0);
    let left: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "published {} events (+{extra} extra); {left} row(s) left in the outbox table",
        events.len()
    );
    let shape = |e: &Event| {
        (
            e.id,
            e.topic.clone(),
            e.key.clone(),
            e.payload.clone(),
            e.headers.clone(),
        )
    };
    assert_eq!(
        events.iter().map(shape).collect::<Vec<_>>(),
        [&retired[0], &retired[1], &kept]
            .into_iter()
            .map(shape)
            .collect::<Vec<_>>()
    );
    assert_eq!(extra, 0);
    assert_eq!(left, 1, "the retired rows are gone, the plain one stays");
    drop(source);
    capture.drop_all().await;
}

/// Invariant: the replication connection trusts what the pool trusts
/// (`sslmode`, `sslrootcert`): under verify-full with the stack's CA it
/// streams over TLS; with a CA that did not sign the server's certificate
/// it stops with a permanent error that says TLS.
#[tokio::test]
async fn the_replication_connection_uses_the_pools_tls_settings() {
    let capture = Capture::new("tls").await;
    let pg = outbox_pg::PgConfig {
        host: "localhost".into(),
        ssl_mode: outbox_pg::SslMode::VerifyFull,
        ssl_root_cert: Some(test_support::tls_file("ca.crt")),
        ..pg_config()
    };
    let source = WalSource::start(
        &pg,
        capture.pool.clone(),
        capture.config.clone(),
        &capture.dead,
    )
    .unwrap();
    wait_for_slot(&capture).await;
    settle_load(&capture, &source).await;
    let client = capture.pool.get().await.unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_replication_slots r ON r.active_pid = s.pid \
             WHERE r.slot_name = $1",
            &[&capture.config.slot],
        )
        .await
        .unwrap()
        .get(0);
    capture
        .sql(&format!(
            "INSERT INTO {} VALUES (1, 'over tls', 1, NULL)",
            capture.table
        ))
        .await;
    let (events, claims) = capture.claim(&source, 1).await;
    acknowledge_all(&source, claims).await;
    println!("streamed over TLS: {ssl}; events: {}", events.len());
    assert!(ssl, "the walsender's session is not encrypted");
    assert_eq!(events.len(), 1);
    drop(source);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let wrong = outbox_pg::PgConfig {
        ssl_root_cert: Some(test_support::tls_file("other-ca.crt")),
        ..pg
    };
    let source = WalSource::start(
        &wrong,
        capture.pool.clone(),
        capture.config.clone(),
        &capture.dead,
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match source.claim(10).await {
            Err(err) => break err,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(_) => panic!("a certificate from another CA was accepted"),
        }
    };
    let text = outbox_core::ErrorChain(&err).to_string();
    println!("{text}");
    assert!(!err.is_retryable(), "{text}");
    assert!(text.to_lowercase().contains("tls"), "{text}");
    drop(source);
    capture.drop_all().await;
}

/// Waits for the source's permanent error (or fails after 10 s).
async fn permanent_error(source: &WalSource) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match source.claim(10).await {
            Err(err) => {
                assert!(!err.is_retryable(), "{}", outbox_core::ErrorChain(&err));
                return outbox_core::ErrorChain(&err).to_string();
            }
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(_) => panic!("no error"),
        }
    }
}

/// Invariant: what only an operator can fix stops the source with a
/// permanent error that says the fix: a role without REPLICATION, and a
/// missing publication the relay may not create.
#[tokio::test]
async fn misconfiguration_is_permanent_and_names_the_fix() {
    let capture = Capture::new("misconf").await;
    let client = capture.pool.get().await.unwrap();
    client
        .batch_execute(
            "DROP ROLE IF EXISTS w_misconf_role;
             CREATE ROLE w_misconf_role LOGIN PASSWORD 'w_misconf' NOREPLICATION;",
        )
        .await
        .unwrap();
    let no_replication = outbox_pg::PgConfig {
        user: "w_misconf_role".into(),
        password: "w_misconf".into(),
        ..pg_config()
    };
    // The checks run on the pool (admin); the stream as the role.
    let source = WalSource::start(
        &no_replication,
        capture.pool.clone(),
        capture.config.clone(),
        &capture.dead,
    )
    .unwrap();
    let privilege = permanent_error(&source).await;
    drop(source);
    println!("{privilege}");
    assert!(privilege.contains("REPLICATION"), "{privilege}");

    let refrained = WalConfig {
        create: false,
        publication: "w_misconf_none".into(),
        ..capture.config.clone()
    };
    let source =
        WalSource::start(&pg_config(), capture.pool.clone(), refrained, &capture.dead).unwrap();
    let publication = permanent_error(&source).await;
    drop(source);
    println!("{publication}");
    assert!(
        publication.contains("CREATE PUBLICATION w_misconf_none"),
        "{publication}"
    );
    client
        .batch_execute("DROP ROLE IF EXISTS w_misconf_role")
        .await
        .unwrap();
    capture.drop_all().await;
}

/// Invariant (a relay cut off and healed after the takeover confirms
/// nothing): relay A's paths to the server go silent right after it
/// acknowledged a batch; the server ends A's session after
/// `wal_sender_timeout` and relay B takes the slot over, publishes the
/// batch again and confirms further. When the path heals, A's late record
/// of its position lands after B's: it must not move the record back, or a
/// relay started afterwards stops, taking the slot for one created again
/// (what the chaos harness saw: two relays stopped 4 s after such a heal).
#[tokio::test]
async fn a_relay_that_wakes_after_a_takeover_leaves_the_slot_usable() {
    let capture = Capture::new("stale").await;
    let direct = pg_config();
    let upstream = tokio::net::lookup_host((direct.host.as_str(), direct.port))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = netfault::FaultProxy::start(upstream).await.unwrap();
    let through_proxy = outbox_pg::PgConfig {
        host: "127.0.0.1".into(),
        port: proxy.addr().port(),
        ..direct.clone()
    };
    // Both of A's paths to the server (the pool, which records positions,
    // and the stream) go through the proxy.
    let a_pool = through_proxy.create_pool().unwrap();
    let a = WalSource::start(
        &through_proxy,
        a_pool,
        capture.config.clone(),
        &capture.dead,
    )
    .unwrap();
    wait_for_slot(&capture).await;
    settle_load(&capture, &a).await;
    let t = &capture.table;
    capture
        .sql(&format!("INSERT INTO {t} VALUES (1, 'a', 1, NULL)"))
        .await;
    let (stale, stale_claims) = capture.claim(&a, 1).await;
    assert_eq!(stale.len(), 1);
    // A goes silent right after it finished its batch: the record of its
    // position (its next status interval) is held on the way. B waits for
    // the slot and takes it over.
    proxy.set(netfault::Fault::Blackhole, netfault::Fault::Blackhole);
    acknowledge_all(&a, stale_claims).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = capture.source();
    capture
        .sql(&format!("INSERT INTO {t} VALUES (2, 'b', 2, NULL)"))
        .await;
    let started = std::time::Instant::now();
    let (taken_over, claims) = capture.claim(&b, 2).await;
    println!("B took over after {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(
        taken_over.len(),
        2,
        "B publishes A's batch and the next change"
    );
    acknowledge_all(&b, claims).await;
    // B records and confirms its position; then A's path heals and A's
    // late record lands.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(netfault::Fault::Pass, netfault::Fault::Pass);
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(a);
    drop(b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = capture.source();
    capture
        .sql(&format!("INSERT INTO {t} VALUES (3, 'c', 3, NULL)"))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Event| body(e)["after"]["id"] == 3) {
        match c.claim(10).await {
            Ok(Some(claimed)) => {
                seen.extend(claimed.events.iter().cloned());
                acknowledge_all(&c, vec![claimed]).await;
            }
            Ok(None) => c.wait_for_events(Duration::from_millis(100)).await.unwrap(),
            Err(err) => panic!(
                "the relay after the takeover stopped: {}",
                outbox_core::ErrorChain(&err)
            ),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay after the takeover streams nothing"
        );
    }
    println!("a later relay streams on: {} events", seen.len());
    drop(c);
    capture.drop_all().await;
}

/// Invariant: a relay that stops once nothing is pending (`--drain`) does
/// not stop before its stream read what the WAL already holds: events
/// emitted before the relay started are claimed before a claim first says
/// nothing is pending.
#[tokio::test]
async fn the_first_claim_waits_for_the_stream_to_reach_the_wal_end() {
    let mut capture = Capture::new("drain").await;
    capture.config.tables = Vec::new();
    let client = capture.pool.get().await.unwrap();
    outbox_pg::wal::create_slot(&client, &capture.config)
        .await
        .unwrap();
    let outbox = Outbox::new(&OutboxConfig::default().validate().unwrap())
        .with_message_prefix(capture.config.message_prefix.clone());
    let events: Vec<Event> = (0..5)
        .map(|i| Event::new("orders", format!("{i}")))
        .collect();
    outbox.emit(&client, &events).await.unwrap();
    let source = capture.source();
    // What a draining relay does: claim until a claim says nothing is pending.
    let mut before_idle = 0;
    while let Some(claimed) = source.claim(100).await.unwrap() {
        before_idle += claimed.events.len();
        acknowledge_all(&source, vec![claimed]).await;
    }
    println!("a new relay claimed {before_idle} events before its first empty claim");
    assert_eq!(
        before_idle, 5,
        "a claim said nothing was pending before the stream caught up"
    );
    drop(source);
    capture.drop_all().await;
}

/// Invariant: `Outbox::emit_sqlx` is `Outbox::emit` on a sqlx transaction:
/// what it commits is streamed with its ids, in order; what it rolls back
/// never is.
#[cfg(feature = "sqlx")]
#[tokio::test]
async fn sqlx_transactions_emit_atomically() {
    let mut capture = Capture::new("emitsqlx").await;
    capture.config.tables = Vec::new();
    let source = capture.source();
    wait_for_slot(&capture).await;
    settle_load(&capture, &source).await;
    let pg = pg_config();
    let url = format!(
        "postgres://{}:{}@{}:{}/{}?sslmode=disable",
        pg.user, pg.password, pg.host, pg.port, pg.dbname
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let outbox = Outbox::new(&OutboxConfig::default().validate().unwrap())
        .with_message_prefix(capture.config.message_prefix.clone());
    let kept: Vec<Event> = (0..2)
        .map(|i| Event::new("orders", format!("kept {i}")).with_key("k"))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(outbox.emit_sqlx(&mut tx, &kept).await.unwrap(), 2);
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox
        .emit_sqlx(&mut tx, &[Event::new("orders", "rolled back")])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let (events, claims) = capture.claim(&source, 2).await;
    acknowledge_all(&source, claims).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let extra = source
        .claim(10)
        .await
        .unwrap()
        .map(|c| c.events.len())
        .unwrap_or(0);
    println!("streamed {} events from sqlx, {extra} extra", events.len());
    assert_eq!(
        events.iter().map(|e| e.id).collect::<Vec<_>>(),
        kept.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    assert_eq!(extra, 0);
    drop(source);
    capture.drop_all().await;
}

/// Invariant: an acknowledgement settles a prefix only. With the broker's
/// answers [acknowledged, not taken, refused for good], the stream moves
/// past the first event only; the other two are read again, with their
/// ids, in order, and the refused one is not dead-lettered while an
/// earlier event of the stream is still pending (it is published again).
#[tokio::test]
async fn an_acknowledgement_settles_only_the_prefix_before_a_failure() {
    let mut capture = Capture::new("prefix").await;
    capture.config.tables = Vec::new();
    let source = capture.source();
    wait_for_slot(&capture).await;
    settle_load(&capture, &source).await;
    let outbox = Outbox::new(&OutboxConfig::default().validate().unwrap())
        .with_message_prefix(capture.config.message_prefix.clone());
    let events: Vec<Event> = (0..3)
        .map(|i| Event::new("orders", format!("{i}")))
        .collect();
    let mut client = capture.pool.get().await.unwrap();
    for event in &events {
        let tx = client.transaction().await.unwrap();
        outbox.emit(&tx, std::slice::from_ref(event)).await.unwrap();
        tx.commit().await.unwrap();
    }
    // All three queued, then claimed at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let claimed = source.claim(3).await.unwrap().unwrap();
    assert_eq!(claimed.events.len(), 3);
    let summary = source
        .acknowledge(
            claimed,
            &[
                ack(0),
                Delivery::Retryable("timed out".into()),
                Delivery::Rejected("too large".into()),
            ],
        )
        .await
        .unwrap();
    // Read again from the last position the server has: the first event
    // too when its confirmation had not been sent yet (a copy the sink
    // skips), then the two unsettled ones, in order.
    let mut again = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !again.iter().any(|e: &Event| e.id == events[2].id) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "read again: {again:?}"
        );
        match source.claim(10).await.unwrap() {
            Some(claimed) => {
                again.extend(claimed.events.iter().cloned());
                acknowledge_all(&source, vec![claimed]).await;
            }
            None => source
                .wait_for_events(Duration::from_millis(100))
                .await
                .unwrap(),
        }
    }
    if again.first().map(|e| e.id) == Some(events[0].id) {
        again.remove(0);
    }
    let dead: i64 = client
        .query_one(&format!("SELECT count(*) FROM {}", capture.dead), &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "summary {summary:?}; read again: {}; dead letters: {dead}",
        again.len()
    );
    assert_eq!(
        (summary.completed, summary.dead_lettered, summary.released),
        (1, 0, 2)
    );
    assert_eq!(
        again.iter().map(|e| e.id).collect::<Vec<_>>(),
        events[1..].iter().map(|e| e.id).collect::<Vec<_>>()
    );
    assert_eq!(dead, 0);
    drop(source);
    capture.drop_all().await;
}

/// A capture `w_<name>` read by two sources: one that streams transactions
/// in progress (its session at 64 kB of decoding memory, 32 KiB held in
/// memory before it spills) and one on a second slot with protocol 1, the
/// reference. Both have settled their (empty) initial load.
async fn streaming_and_protocol_1(name: &str) -> (Capture, WalSource, Capture, WalSource) {
    let streamed = Capture::new(name).await;
    let reference = Capture {
        pool: streamed.pool.clone(),
        config: WalConfig {
            slot: format!("w_{name}_p1"),
            stream_in_progress: false,
            ..streamed.config.clone()
        },
        table: streamed.table.clone(),
        dead: streamed.dead.clone(),
    };
    let client = streamed.pool.get().await.unwrap();
    test_support::drop_slot(&client, &reference.config.slot)
        .await
        .unwrap();
    let config = WalConfig {
        decoding_work_mem_kb: Some(64),
        in_progress_memory: 32 * 1024,
        ..streamed.config.clone()
    };
    let source =
        WalSource::start(&pg_config(), streamed.pool.clone(), config, &streamed.dead).unwrap();
    wait_for_slot(&streamed).await;
    settle_load(&streamed, &source).await;
    let protocol_1 = reference.source();
    wait_for_slot(&reference).await;
    settle_load(&reference, &protocol_1).await;
    (streamed, source, reference, protocol_1)
}

/// Transactions the server streamed to `slot` while they ran.
async fn server_streamed(pool: &deadpool_postgres::Pool, slot: &str) -> i64 {
    pool.get()
        .await
        .unwrap()
        .query_one(
            "SELECT coalesce(max(stream_txns), 0) FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

/// The events' ids, topics, keys and payloads, in order.
fn summary(events: &[Event]) -> Vec<(uuid::Uuid, String, Option<bytes::Bytes>, bytes::Bytes)> {
    events
        .iter()
        .map(|e| (e.id, e.topic.clone(), e.key.clone(), e.payload.clone()))
        .collect()
}

/// Invariant: events emitted in a streamed transaction under a savepoint
/// that is rolled back never come out, though pgoutput tags each streamed
/// logical message with the top transaction's xid (so the savepoint's
/// abort does not say which it took): the source reads such a transaction
/// again unstreamed, and then streams large transactions again. Events,
/// ids and order equal a protocol-1 slot's.
#[tokio::test]
async fn events_of_a_rolled_back_savepoint_in_a_streamed_transaction_never_come_out() {
    let (streamed, source, reference, protocol_1) = streaming_and_protocol_1("streamsp").await;
    let outbox = Outbox::new(&OutboxConfig::default().validate().unwrap())
        .with_message_prefix(streamed.config.message_prefix.clone());
    let batch = |label: &str, n: usize| -> Vec<Event> {
        (0..n)
            .map(|i| {
                Event::new("orders", format!("{label} {i} {}", "x".repeat(100)))
                    .with_key(format!("k{}", i % 7))
            })
            .collect()
    };
    let mut client = streamed.pool.get().await.unwrap();
    let mut tx = client.transaction().await.unwrap();
    outbox.emit(&tx, &batch("kept", 1000)).await.unwrap();
    let savepoint = tx.savepoint("doomed").await.unwrap();
    outbox
        .emit(&savepoint, &batch("doomed", 300))
        .await
        .unwrap();
    savepoint.rollback().await.unwrap();
    outbox.emit(&tx, &batch("after", 10)).await.unwrap();
    tx.commit().await.unwrap();
    let (events, claims) = streamed.claim(&source, 1010).await;
    acknowledge_all(&source, claims).await;
    let (reference_events, claims) = reference.claim(&protocol_1, 1010).await;
    acknowledge_all(&protocol_1, claims).await;
    let doomed = |events: &[Event]| {
        events
            .iter()
            .filter(|e| e.payload.starts_with(b"doomed"))
            .count()
    };
    let first = (events.len(), doomed(&events), source.streamed());

    // Once past it, large transactions are streamed again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !source.streamed().active {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the source never streamed again"
        );
        // The transaction's end comes after its last event: claimed (with
        // nothing in it) and acknowledged, it moves the position past it.
        if let Some(claimed) = source.claim(10).await.unwrap() {
            assert!(claimed.events.is_empty(), "nothing more was written");
            acknowledge_all(&source, vec![claimed]).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tx = client.transaction().await.unwrap();
    outbox.emit(&tx, &batch("later", 1000)).await.unwrap();
    tx.commit().await.unwrap();
    let (later, claims) = streamed.claim(&source, 1000).await;
    acknowledge_all(&source, claims).await;
    let (later_reference, claims) = reference.claim(&protocol_1, 1000).await;
    acknowledge_all(&protocol_1, claims).await;
    let server = server_streamed(&streamed.pool, &streamed.config.slot).await;
    println!(
        "savepoint transaction: events={} doomed={} reference={} relay={:?}; later transaction: events={} relay={:?}; server streamed {server}",
        first.0,
        first.1,
        reference_events.len(),
        first.2,
        later.len(),
        source.streamed()
    );
    let same = summary(&events) == summary(&reference_events)
        && summary(&later) == summary(&later_reference);
    let after = source.streamed();
    drop(source);
    drop(protocol_1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    test_support::drop_slot(&client, &reference.config.slot)
        .await
        .unwrap();
    streamed.drop_all().await;
    assert_eq!(
        (first.0, first.1),
        (1010, 0),
        "the savepoint's 300 events never come out"
    );
    assert!(same, "the same events, ids and order as protocol 1 gives");
    assert_eq!(
        first.2.transactions, 0,
        "the savepoint's transaction was read unstreamed"
    );
    assert_eq!(later.len(), 1000);
    assert_eq!(after.transactions, 1, "the later transaction was streamed");
    assert!(server >= 2, "the server streamed both: {server}");
}

/// Invariant (pgoutput protocol 2): a transaction larger than the
/// walsender's `logical_decoding_work_mem` arrives while it runs, and its
/// events still come out once, at its commit, whole, in commit order, with
/// the ids and payloads a protocol-1 reader of the same WAL gives them
/// (small transactions committed while it ran come before it); a rolled
/// back savepoint's rows and an aborted large transaction leave nothing.
/// The streaming relay holds 32 KiB in memory, so it spills to a file too.
#[tokio::test]
async fn large_transactions_stream_while_they_run_and_come_out_as_committed() {
    let (streamed, source, reference, protocol_1) = streaming_and_protocol_1("streamed").await;
    let t = &streamed.table;
    let large = streamed.pool.get().await.unwrap();
    let note = "n".repeat(200);
    let mut expected = 0;
    large.batch_execute("BEGIN").await.unwrap();
    for round in 0..6 {
        // 500 rows (about 120 kB of changes) per round, then a small
        // transaction that commits while the large one runs.
        let from = round * 500 + 1;
        large
            .batch_execute(&format!(
                "INSERT INTO {t} SELECT g, 'large', g, '{note}' FROM generate_series({from}, {}) g",
                from + 499
            ))
            .await
            .unwrap();
        streamed
            .sql(&format!(
                "INSERT INTO {t} VALUES ({}, 'small', 0, NULL)",
                100_000 + round
            ))
            .await;
        expected += 501;
    }
    large
        .batch_execute(&format!(
            "SAVEPOINT a;
             INSERT INTO {t} SELECT g, 'rolled back', g, '{note}' FROM generate_series(50001, 50500) g;
             ROLLBACK TO SAVEPOINT a;
             SAVEPOINT b;
             UPDATE {t} SET amount = -amount WHERE id <= 100;
             RELEASE SAVEPOINT b;
             INSERT INTO {t} VALUES (60000, 'last of the large', 1, NULL);
             COMMIT;"
        ))
        .await
        .unwrap();
    expected += 101;
    large
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO {t} SELECT g, 'aborted', g, '{note}' FROM generate_series(70001, 73000) g;
             ROLLBACK;"
        ))
        .await
        .unwrap();
    streamed
        .sql(&format!(
            "INSERT INTO {t} VALUES (200000, 'after', 0, NULL)"
        ))
        .await;
    expected += 1;

    let (events, claims) = streamed.claim(&source, expected).await;
    acknowledge_all(&source, claims).await;
    let (reference_events, claims) = reference.claim(&protocol_1, expected).await;
    acknowledge_all(&protocol_1, claims).await;
    let on_streamed = server_streamed(&streamed.pool, &streamed.config.slot).await;
    let on_reference = server_streamed(&streamed.pool, &reference.config.slot).await;
    let owners = |events: &[Event]| {
        let mut runs: Vec<(String, usize)> = Vec::new();
        for event in events {
            let owner = body(event)["after"]["owner"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            match runs.last_mut() {
                Some((last, n)) if *last == owner => *n += 1,
                _ => runs.push((owner, 1)),
            }
        }
        runs
    };
    let relay = source.streamed();
    println!(
        "events={} reference={} runs={:?} streamed by the server: to the streaming slot {on_streamed}, \
         to the protocol-1 slot {on_reference}; relay: {relay:?}",
        events.len(),
        reference_events.len(),
        owners(&events)
    );
    let same = summary(&events) == summary(&reference_events);
    drop(source);
    drop(protocol_1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = streamed.pool.get().await.unwrap();
    test_support::drop_slot(&client, &reference.config.slot)
        .await
        .unwrap();
    streamed.drop_all().await;

    assert_eq!(events.len(), expected, "every committed change once");
    assert!(same, "the same events, ids and order as protocol 1 gives");
    assert_eq!(
        owners(&events),
        [
            ("small".to_string(), 6),
            ("large".to_string(), 3000 + 100),
            ("last of the large".to_string(), 1),
            ("after".to_string(), 1)
        ],
        "commit order: the small transactions first, the large one whole"
    );
    assert!(
        on_streamed >= 2,
        "the server streamed the large transactions: {on_streamed}"
    );
    assert_eq!(on_reference, 0, "protocol 1 streams nothing");
    // At least: other tests' large transactions reach this slot too.
    assert!(
        relay.transactions >= 1,
        "the large transaction came streamed: {relay:?}"
    );
    assert!(
        relay.spilled_bytes > 0,
        "past 32 KiB the relay spills: {relay:?}"
    );
}

/// Invariant: a relay whose queue is full (the broker is slow) keeps its
/// replication session past the server's `wal_sender_timeout` (10 s in the
/// stack): the session is the same when the relay drains, and every event
/// comes once. Ended sessions mean re-reading and, with standbys, a
/// takeover at every slow moment of the broker.
#[tokio::test]
async fn a_full_queue_keeps_the_session_past_the_sender_timeout() {
    let mut capture = Capture::new("fullq").await;
    capture.config.read_ahead = 100;
    let source = capture.source();
    wait_for_slot(&capture).await;
    settle_load(&capture, &source).await;
    let session = || async {
        let client = capture.pool.get().await.unwrap();
        client
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&capture.config.slot],
            )
            .await
            .unwrap()
            .get::<_, Option<i32>>(0)
    };
    let before = session().await;
    let t = &capture.table;
    capture
        .sql(&format!(
            "INSERT INTO {t} SELECT g, 'o', g, NULL FROM generate_series(1, 1000) g"
        ))
        .await;
    let timeout: String = capture
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SHOW wal_sender_timeout", &[])
        .await
        .unwrap()
        .get(0);
    // Nothing claimed for longer than the server waits for a reply.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let during = session().await;
    let (events, claims) = capture.claim(&source, 1000).await;
    acknowledge_all(&source, claims).await;
    let distinct: std::collections::HashSet<_> = events.iter().map(|e| e.id).collect();
    println!(
        "wal_sender_timeout={timeout} session before={before:?} after 15 s with a full queue={during:?} \
         events={} distinct={}",
        events.len(),
        distinct.len()
    );
    drop(source);
    tokio::time::sleep(Duration::from_millis(300)).await;
    capture.drop_all().await;
    assert!(before.is_some());
    assert_eq!(during, before, "the same session streams the slot");
    assert_eq!((events.len(), distinct.len()), (1000, 1000));
}
