//! Integration tests of outbox-pg against a real PostgreSQL.
//!
//! Needs the server of `scripts/stack.sh up`; override its address with
//! `OUTBOX_PG_HOST` / `OUTBOX_PG_PORT`. Each test uses tables named after it.

#[path = "../common/mod.rs"]
mod common;
mod leases;
#[cfg(feature = "otel")]
mod otel;
#[cfg(feature = "sqlx")]
mod sqlx;
mod tls;
#[cfg(feature = "wal")]
mod wal;

use common::{ack, outbox_config, pg_config, setup, setup_with};

use std::time::Duration;

use outbox_core::{Delivery, Event, Source};
use outbox_pg::{
    migrate, schema_sql, FlagTableConfig, FlagTableSource, Outbox, OutboxConfig, PgConfig, PgError,
    PgOutboxSource,
};

#[test]
fn init_sql_holds_the_generated_schema() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../init.sql");
    let text = std::fs::read_to_string(path).unwrap();
    let begin = "-- BEGIN outbox schema";
    let end = "-- END outbox schema";
    let start = text.find(begin).expect("init.sql lacks the BEGIN marker");
    let body_start = start + text[start..].find('\n').unwrap() + 1;
    let body_end = text.find(end).expect("init.sql lacks the END marker");
    let generated = schema_sql(&OutboxConfig::default().validate().unwrap());
    if std::env::var("UPDATE_INIT_SQL").is_ok() {
        let updated = format!("{}{}{}", &text[..body_start], generated, &text[body_end..]);
        std::fs::write(path, updated).unwrap();
        return;
    }
    assert_eq!(
        &text[body_start..body_end],
        generated,
        "init.sql is out of date: run UPDATE_INIT_SQL=1 cargo test -p outbox-pg init_sql"
    );
}

/// The demo's flag table wakes the relay out of the box: init.sql installs
/// the trigger `flag_notify_sql` gives for the default names.
#[test]
fn init_sql_installs_the_flag_tables_notify_trigger() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../init.sql")).unwrap();
    let generated = outbox_pg::flag_notify_sql(&FlagTableConfig::default().validate().unwrap());
    assert!(
        text.contains(&generated),
        "init.sql lacks the flag table's trigger; add:\n{generated}"
    );
}

#[tokio::test]
async fn migration_is_idempotent_and_names_are_validated() {
    let (pool, config) = setup("migrate").await;
    let client = pool.get().await.unwrap();
    migrate(&client, &config).await.unwrap();
    migrate(&client, &config).await.unwrap();
    let hostile = OutboxConfig {
        table: "outbox; DROP TABLE user_logins; --".into(),
        ..OutboxConfig::default()
    };
    let err = hostile.validate().unwrap_err();
    assert!(matches!(err, PgError::InvalidIdentifier { .. }), "{err}");
    assert!(err.to_string().contains("invalid identifier"), "{err}");
}

/// Invariant: an event is claimable exactly when its transaction committed.
#[tokio::test]
async fn committed_events_are_claimed_and_rolled_back_ones_never() {
    let (pool, config) = setup("commit_rollback").await;
    let outbox = Outbox::new(&config);
    let committed: Vec<Event> = (0..3)
        .map(|i| Event::new("orders", format!("c{i}")).with_key("k"))
        .collect();
    let rolled_back: Vec<Event> = (0..2)
        .map(|i| Event::new("orders", format!("r{i}")))
        .collect();

    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    assert_eq!(outbox.enqueue(&tx, &committed).await.unwrap(), 3);
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    assert_eq!(outbox.enqueue(&tx, &rolled_back).await.unwrap(), 2);
    tx.rollback().await.unwrap();

    let source = PgOutboxSource::new(pool.clone(), "test", config);
    let claimed = source.claim(100).await.unwrap().expect("events pending");
    let ids: Vec<_> = claimed.events.iter().map(|e| e.id).collect();
    println!("committed=3 rolled_back=2 claimed={}", ids.len());
    assert_eq!(ids, committed.iter().map(|e| e.id).collect::<Vec<_>>());
    assert_eq!(claimed.events[0].payload, "c0");
    assert_eq!(claimed.events[0].key.as_deref(), Some(&b"k"[..]));
    let summary = source
        .acknowledge(claimed, &[ack(0), ack(1), ack(2)])
        .await
        .unwrap();
    assert_eq!(summary.completed, 3);
    assert!(source.claim(100).await.unwrap().is_none());
}

/// Invariant: only acknowledged events leave the outbox; rejected ones are
/// dead-lettered with their reason; retryable ones stay pending.
#[tokio::test]
async fn acknowledge_applies_each_outcome() {
    let (pool, config) = setup("outcomes").await;
    let outbox = Outbox::new(&config);
    let events: Vec<Event> = (0..3).map(|i| Event::new("t", format!("e{i}"))).collect();
    let client = pool.get().await.unwrap();
    outbox.enqueue(&client, &events).await.unwrap();

    let source = PgOutboxSource::new(pool.clone(), "test", config);
    let claimed = source.claim(10).await.unwrap().unwrap();
    let summary = source
        .acknowledge(
            claimed,
            &[
                ack(5),
                Delivery::Rejected("message too large".into()),
                Delivery::Retryable("timed out".into()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        (summary.completed, summary.dead_lettered, summary.released),
        (1, 1, 1)
    );

    let pending = client
        .query("SELECT event_id, attempts, last_error FROM t_outcomes", &[])
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].get::<_, uuid::Uuid>(0), events[2].id);
    assert_eq!(pending[0].get::<_, i32>(1), 1);
    assert_eq!(pending[0].get::<_, String>(2), "timed out");

    let dead = client
        .query(
            "SELECT event_id, reason, origin, attempts FROM t_outcomes_dead",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].get::<_, uuid::Uuid>(0), events[1].id);
    assert_eq!(dead[0].get::<_, String>(1), "message too large");
    assert_eq!(dead[0].get::<_, String>(2), "t_outcomes");
    assert_eq!(dead[0].get::<_, i32>(3), 1);
}

/// Invariant (no loss, no silent duplicate): an acknowledgement that does
/// not find every claimed row where its claim read it (here a trigger of
/// the user's keeps one row from being deleted) is a retryable error, rolls
/// the whole claim back and leaves every event pending, lanes unlocked.
#[tokio::test]
async fn acknowledgement_missing_a_row_rolls_the_claim_back() {
    let (pool, config) = setup("rows_moved").await;
    let outbox = Outbox::new(&config);
    let events: Vec<Event> = (0..3)
        .map(|i| Event::new("t", format!("e{i}")).with_key("k"))
        .collect();
    let client = pool.get().await.unwrap();
    outbox.enqueue(&client, &events).await.unwrap();
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION keep_e1() RETURNS trigger LANGUAGE plpgsql AS $$ \
               BEGIN IF OLD.payload = 'e1'::bytea THEN RETURN NULL; END IF; RETURN OLD; END $$; \
             CREATE TRIGGER keep_e1 BEFORE DELETE ON t_rows_moved FOR EACH ROW EXECUTE FUNCTION keep_e1()",
        )
        .await
        .unwrap();

    let source = PgOutboxSource::new(pool.clone(), "test", config);
    let claimed = source.claim(10).await.unwrap().unwrap();
    assert_eq!(claimed.events.len(), 3);
    let err = source
        .acknowledge(claimed, &[ack(0), ack(1), ack(2)])
        .await
        .unwrap_err();
    let text = outbox_core::ErrorChain(&err).to_string();
    println!("{text}");
    assert!(err.is_retryable(), "{text}");
    assert!(text.contains("found 2 of the 3 claimed rows"), "{text}");
    let pending: i64 = client
        .query_one("SELECT count(*) FROM t_rows_moved", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 3, "the claim was rolled back: nothing deleted");

    // Once the trigger is gone, the same events are claimed (their lane was
    // unlocked) and acknowledged.
    client
        .batch_execute("DROP TRIGGER keep_e1 ON t_rows_moved; DROP FUNCTION keep_e1()")
        .await
        .unwrap();
    let claimed = source.claim(10).await.unwrap().unwrap();
    let ids: Vec<_> = claimed.events.iter().map(|e| e.id).collect();
    assert_eq!(ids, events.iter().map(|e| e.id).collect::<Vec<_>>());
    source
        .acknowledge(claimed, &[ack(0), ack(1), ack(2)])
        .await
        .unwrap();
    let pending: i64 = client
        .query_one("SELECT count(*) FROM t_rows_moved", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 0);
}

/// Invariant: a claim that is dropped (relay died) leaves every event pending,
/// and two claims at once never share an event nor a lane (lane locks plus
/// SKIP LOCKED), so no key is worked by two relays at once.
#[tokio::test]
async fn claims_are_exclusive_by_lane_and_abandoned_claims_release() {
    // Enough lanes per claim for one claim to take every free lane.
    let config = OutboxConfig {
        lanes_per_claim: 64,
        ..outbox_config("exclusive")
    };
    let (pool, config) = setup_with("exclusive", config).await;
    let outbox = Outbox::new(&config);
    let events: Vec<Event> = (0..40)
        .map(|i| Event::new("t", format!("e{i}")).with_key(format!("key{}", i / 4)))
        .collect();
    let client = pool.get().await.unwrap();
    outbox.enqueue(&client, &events).await.unwrap();
    let lane_of = |ids: Vec<uuid::Uuid>| {
        let client = &client;
        async move {
            let rows = client
                .query(
                    "SELECT DISTINCT lane FROM t_exclusive WHERE event_id = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap();
            rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>()
        }
    };

    let source = PgOutboxSource::new(pool.clone(), "test", config);
    let first = source.claim(15).await.unwrap().unwrap();
    let second = source
        .claim(100)
        .await
        .unwrap()
        .expect("other lanes are free");
    let first_lanes = lane_of(first.events.iter().map(|e| e.id).collect()).await;
    let second_lanes = lane_of(second.events.iter().map(|e| e.id).collect()).await;
    println!(
        "first: events={} lanes={first_lanes:?}; second: events={} lanes={second_lanes:?}",
        first.events.len(),
        second.events.len()
    );
    assert_eq!(first.events.len(), 15);
    assert!(first
        .events
        .iter()
        .all(|e| second.events.iter().all(|o| o.id != e.id)));
    assert!(
        first_lanes.iter().all(|l| !second_lanes.contains(l)),
        "a lane was claimed twice"
    );
    // Within a claim, each key's events come in enqueue order.
    for claimed in [&first, &second] {
        let mut last_index: std::collections::HashMap<_, usize> = Default::default();
        for event in &claimed.events {
            let index = events.iter().position(|e| e.id == event.id).unwrap();
            let previous = last_index.insert(event.key.clone(), index);
            assert!(
                previous.is_none_or(|p| p < index),
                "key order broken in a claim"
            );
        }
    }
    drop(first);
    drop(second);
    // Closing the connections rolls back and releases the lanes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = source.claim(100).await.unwrap().unwrap();
    println!("claimed_after_abandon={}", again.events.len());
    assert_eq!(again.events.len(), 40);
}

/// Invariant (no stuck lane): a claim holds lane locks on exactly the lanes
/// of the events it claimed, two claims at once hold disjoint lanes, and
/// once acknowledged (or found empty) a claim leaves no lane locked. A lock
/// left on a pooled connection would keep its lane from every other relay
/// for good. Counted from `pg_locks`, for the sessions of this test's pool.
#[tokio::test]
async fn claims_leave_no_lane_locked() {
    let (setup_pool, config) = setup("lane_locks").await;
    let app = "outbox-test-lane-locks";
    let pool = pool_named(app);
    let outbox = Outbox::new(&config);
    let client = setup_pool.get().await.unwrap();
    let events: Vec<Event> = (0..2000)
        .map(|i| Event::new("t", format!("e{i}")).with_key(format!("k{}", i % 40)))
        .collect();
    outbox.enqueue(&client, &events).await.unwrap();
    let a = PgOutboxSource::new(pool.clone(), "test", config.clone());
    let b = PgOutboxSource::new(pool.clone(), "test", config);
    let held = || advisory_locks_of(&client, app);
    let lanes_of = |claimed: &outbox_core::Claimed<outbox_pg::PgClaim>| {
        let ids: Vec<uuid::Uuid> = claimed.events.iter().map(|e| e.id).collect();
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT count(DISTINCT lane) FROM t_lane_locks WHERE event_id = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let (mut claimed_total, mut rounds, mut overlapping) = (0usize, 0usize, 0usize);
    loop {
        let first = a.claim(100).await.unwrap();
        let second = b.claim(100).await.unwrap();
        let expected = match (&first, &second) {
            (Some(x), Some(y)) => {
                overlapping += 1;
                lanes_of(x).await + lanes_of(y).await
            }
            (Some(x), None) | (None, Some(x)) => lanes_of(x).await,
            (None, None) => 0,
        };
        assert_eq!(
            held().await,
            expected,
            "round {rounds}: locks held by open claims"
        );
        if first.is_none() && second.is_none() {
            break;
        }
        for (source, claimed) in [(&a, first), (&b, second)] {
            if let Some(claimed) = claimed {
                claimed_total += claimed.events.len();
                let acks: Vec<Delivery> =
                    (0..claimed.events.len()).map(|i| ack(i as i64)).collect();
                source.acknowledge(claimed, &acks).await.unwrap();
            }
        }
        assert_eq!(
            held().await,
            0,
            "round {rounds}: locks left after acknowledging"
        );
        rounds += 1;
    }
    println!("claimed={claimed_total} rounds={rounds} rounds_with_two_claims={overlapping}");
    assert_eq!(claimed_total, 2000, "every event claimed once");
    assert!(overlapping > 0, "the two sources never held claims at once");
}

/// Low latency without giving up lanes: under a backlog a claim takes at
/// most `lanes_per_claim` lanes (the others stay free for other relays); a
/// claim that came back short means the relay caught up, and the next claim
/// takes every pending lane, so no event waits for other lanes' turns; a
/// full claim narrows it again.
#[tokio::test]
async fn claims_widen_to_every_pending_lane_once_caught_up() {
    let config = OutboxConfig {
        lanes_per_claim: 2,
        ..outbox_config("widen")
    };
    let (pool, config) = setup_with("widen", config).await;
    let outbox = Outbox::new(&config);
    let events: Vec<Event> = (0..60)
        .map(|i| Event::new("t", format!("e{i}")).with_key(format!("key{}", i % 30)))
        .collect();
    let client = pool.get().await.unwrap();
    outbox.enqueue(&client, &events).await.unwrap();
    let lanes_of = |claimed: &outbox_core::Claimed<outbox_pg::PgClaim>| {
        let ids: Vec<uuid::Uuid> = claimed.events.iter().map(|e| e.id).collect();
        let client = &client;
        async move {
            client
                .query(
                    "SELECT DISTINCT lane FROM t_widen WHERE event_id = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .len()
        }
    };
    let pending_lanes: i64 = client
        .query_one("SELECT count(DISTINCT lane) FROM t_widen", &[])
        .await
        .unwrap()
        .get(0);
    assert!(pending_lanes > 2, "30 keys fell into {pending_lanes} lanes");
    let source = PgOutboxSource::new(pool.clone(), "test", config);
    // Each claim is dropped (rolled back) so the next sees every event again.
    let release = || tokio::time::sleep(Duration::from_millis(200));

    let narrow = source.claim(1000).await.unwrap().unwrap();
    let (narrow_events, narrow_lanes) = (narrow.events.len(), lanes_of(&narrow).await);
    drop(narrow);
    release().await;
    let wide = source.claim(1000).await.unwrap().unwrap();
    let (wide_events, wide_lanes) = (wide.events.len(), lanes_of(&wide).await);
    drop(wide);
    release().await;
    // A full claim (5 of 60): the relay is behind again.
    let full = source.claim(5).await.unwrap().unwrap();
    assert_eq!(full.events.len(), 5);
    drop(full);
    release().await;
    let narrow_again = source.claim(1000).await.unwrap().unwrap();
    let narrow_again_lanes = lanes_of(&narrow_again).await;
    println!(
        "pending_lanes={pending_lanes} first_claim: events={narrow_events} lanes={narrow_lanes}; \
         after_short_claim: events={wide_events} lanes={wide_lanes}; after_full_claim: lanes={narrow_again_lanes}"
    );
    assert!(narrow_lanes <= 2 && narrow_events < 60);
    assert_eq!((wide_events, wide_lanes as i64), (60, pending_lanes));
    assert!(narrow_again_lanes <= 2);
}

/// Invariant: with the trigger of `flag_notify_sql`, an insert into a flag
/// table wakes a listening source at its commit; without it, only the
/// poll's timeout ends a wait; `flag_notify_installed` tells the two apart.
/// Prints how long each wait took while rows
/// were inserted every 50 ms.
#[tokio::test]
async fn flag_table_inserts_wake_a_listening_source_through_its_trigger() {
    let (pool, config) = setup("flagwake").await;
    let client = pool.get().await.unwrap();
    client
        .batch_execute(
            "DROP TABLE IF EXISTS flag_wake;
             CREATE TABLE flag_wake (id bigserial PRIMARY KEY, username text NOT NULL,
               event_type text NOT NULL, event_time timestamptz NOT NULL DEFAULT now(),
               sent_to_kafka boolean NOT NULL DEFAULT false);",
        )
        .await
        .unwrap();
    let flag_config = FlagTableConfig {
        table: "flag_wake".into(),
        topic: "flag_wake".into(),
        dead_letter_table: config.dead_letter_table.clone(),
        ..FlagTableConfig::default()
    }
    .validate()
    .unwrap();
    let source = FlagTableSource::new(pool.clone(), "test", flag_config.clone())
        .listen_for_events(pg_config());
    // The listener wakes once when its session LISTENs; then a short wait
    // takes the permit that wake may have left.
    source
        .wait_for_events(Duration::from_secs(10))
        .await
        .unwrap();
    source
        .wait_for_events(Duration::from_millis(50))
        .await
        .unwrap();

    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let client = pool.get().await.unwrap();
            let mut inserted = 0u32;
            while !stop.is_cancelled() {
                client
                    .execute(
                        "INSERT INTO flag_wake (username, event_type) VALUES ('a', 'login')",
                        &[],
                    )
                    .await
                    .unwrap();
                inserted += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            inserted
        })
    };
    let poll = Duration::from_millis(1500);
    let started = std::time::Instant::now();
    source.wait_for_events(poll).await.unwrap();
    let without_trigger = started.elapsed();

    assert!(!outbox_pg::flag_notify_installed(&client, &flag_config)
        .await
        .unwrap());
    outbox_pg::install_flag_notify(&client, &flag_config)
        .await
        .unwrap();
    // Installing again changes nothing (the stack and the relay may both).
    outbox_pg::install_flag_notify(&client, &flag_config)
        .await
        .unwrap();
    assert!(outbox_pg::flag_notify_installed(&client, &flag_config)
        .await
        .unwrap());
    let started = std::time::Instant::now();
    source
        .wait_for_events(Duration::from_secs(60))
        .await
        .unwrap();
    let with_trigger = started.elapsed();
    stop.cancel();
    let inserted = writer.await.unwrap();
    println!(
        "rows inserted: {inserted}; wait without the trigger {without_trigger:?} (poll {poll:?}), \
         with it {with_trigger:?} (poll 60 s)"
    );
    assert!(
        without_trigger >= poll,
        "a wait ended early without the trigger"
    );
    assert!(
        with_trigger < Duration::from_secs(30),
        "no insert woke the source through the trigger"
    );
}

/// Invariant: a flag-table row is flagged only after acknowledgement, with a
/// stable event id, and is never claimed again once flagged.
#[tokio::test]
async fn flag_table_source_sets_the_flag_only_when_acknowledged() {
    let (pool, config) = setup("flag").await;
    let client = pool.get().await.unwrap();
    client
        .batch_execute(
            "DROP TABLE IF EXISTS flag_logins;
             CREATE TABLE flag_logins (id bigserial PRIMARY KEY, username text NOT NULL,
               event_type text NOT NULL, event_time timestamptz NOT NULL DEFAULT now(),
               sent_to_kafka boolean NOT NULL DEFAULT false);
             INSERT INTO flag_logins (username, event_type) VALUES ('a','login'),('b','login'),('a','logout');",
        )
        .await
        .unwrap();
    let flag_config = FlagTableConfig {
        table: "flag_logins".into(),
        topic: "flag_events".into(),
        dead_letter_table: config.dead_letter_table.clone(),
        ..FlagTableConfig::default()
    }
    .validate()
    .unwrap();
    let probe = outbox_pg::BacklogProbe::flag_table(&flag_config);
    let source = FlagTableSource::new(pool.clone(), "test", flag_config);
    client
        .execute(
            "UPDATE flag_logins SET event_time = now() - interval '1 hour' WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    let before = probe.backlog(&client).await.unwrap();
    assert_eq!(before.pending, 3);
    let age = before.oldest_age.unwrap().as_secs();
    assert!(
        (3590..3700).contains(&age),
        "oldest unsent row aged {age} s"
    );
    let claimed = source.claim(10).await.unwrap().unwrap();
    assert_eq!(claimed.events.len(), 3);
    let payload: serde_json::Value = serde_json::from_slice(&claimed.events[0].payload).unwrap();
    assert_eq!(payload["username"], "a");
    assert!(payload.get("sent_to_kafka").is_none());
    assert_eq!(claimed.events[0].key.as_deref(), Some(&b"a"[..]));
    assert_eq!(
        claimed.events[0].id,
        outbox_pg::flag_row_event_id("flag_logins", 1)
    );
    // Not acknowledged: nothing flagged.
    let summary = source
        .acknowledge(
            claimed,
            &[
                ack(0),
                Delivery::Retryable("down".into()),
                Delivery::Rejected("too large".into()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        (summary.completed, summary.released, summary.dead_lettered),
        (1, 1, 1)
    );
    let flags: Vec<bool> = client
        .query("SELECT sent_to_kafka FROM flag_logins ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(flags, vec![true, false, true]);
    let after = probe.backlog(&client).await.unwrap();
    println!("flag-table backlog: {before:?} before, {after:?} after acknowledging");
    assert_eq!(after.pending, 1, "only the released row is unsent");
    assert!(after.oldest_age.unwrap() < std::time::Duration::from_secs(600));
    let again = source.claim(10).await.unwrap().unwrap();
    assert_eq!(again.events.len(), 1);
    assert_eq!(
        again.events[0].id,
        outbox_pg::flag_row_event_id("flag_logins", 2)
    );
    let dead: i64 = client
        .query_one(
            "SELECT count(*) FROM t_flag_dead WHERE origin = 'flag_logins' AND reason = 'too large'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 1);
}

#[tokio::test]
async fn wrong_password_is_a_clear_permanent_error() {
    let config = PgConfig {
        password: "wrong".into(),
        ..pg_config()
    };
    let pool = config.create_pool().unwrap();
    let err = outbox_pg::check_connection(&pool, &config.target())
        .await
        .unwrap_err();
    let text = err.to_string();
    println!("{text}");
    assert!(!err.is_retryable());
    assert!(
        text.contains("127.0.0.1:") && text.contains("password"),
        "{text}"
    );
    assert!(!text.contains("wrong"), "password leaked: {text}");
}

#[tokio::test]
async fn unreachable_server_is_a_retryable_error_naming_it() {
    let config = PgConfig {
        port: 1,
        connect_timeout: Duration::from_secs(2),
        ..pg_config()
    };
    let pool = config.create_pool().unwrap();
    let err = outbox_pg::check_connection(&pool, &config.target())
        .await
        .unwrap_err();
    let text = err.to_string();
    println!("{text}");
    assert!(err.is_retryable());
    assert!(text.contains("127.0.0.1:1/test_db"), "{text}");
    assert!(text.contains("is PostgreSQL running"), "{text}");
}

/// Invariant (no stalled lane, nothing marked done by a stalled relay): a
/// relay that holds a claim without finishing it (hung, SIGSTOPped) loses
/// its lanes after `claim_timeout`; another relay then claims the same
/// events, and the stalled relay's late acknowledgement removes nothing.
#[tokio::test]
async fn stalled_claim_is_handed_over_after_the_claim_timeout() {
    let config = OutboxConfig {
        claim_timeout: Duration::from_secs(2),
        ..outbox_config("handover")
    };
    let (pool, config) = setup_with("handover", config).await;
    let outbox = Outbox::new(&config);
    let events: Vec<Event> = (0..20)
        .map(|i| Event::new("t", format!("e{i}")).with_key(format!("key{}", i % 3)))
        .collect();
    let client = pool.get().await.unwrap();
    outbox.enqueue(&client, &events).await.unwrap();

    let stalled_relay = PgOutboxSource::new(pool.clone(), "test", config.clone());
    let other_relay = PgOutboxSource::new(pool.clone(), "test", config);
    let stalled = stalled_relay.claim(100).await.unwrap().unwrap();
    assert_eq!(stalled.events.len(), 20);
    assert!(
        other_relay.claim(100).await.unwrap().is_none(),
        "lanes must stay with their claimer"
    );

    let started = std::time::Instant::now();
    let taken = loop {
        if let Some(claimed) = other_relay.claim(100).await.unwrap() {
            break claimed;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "lanes never handed over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let handover = started.elapsed();
    let late = stalled_relay.acknowledge(stalled, &vec![ack(0); 20]).await;
    let still_pending: i64 = client
        .query_one("SELECT count(*) FROM t_handover", &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "claim_timeout=2s handover_after={handover:?} taken={} stalled_ack_failed={} pending={still_pending}",
        taken.events.len(),
        late.is_err()
    );
    assert_eq!(taken.events.len(), 20);
    assert!(handover < Duration::from_secs(5));
    assert!(late.is_err(), "a stalled relay must not mark anything done");
    assert_eq!(still_pending, 20);
    let ids: Vec<_> = taken.events.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        events.iter().map(|e| e.id).collect::<Vec<_>>(),
        "order kept across the handover"
    );
}

/// A flag table `flag_<name>` of `rows` logins, all of user `a` but every
/// third of `b`, and a source over it.
async fn flag_table(name: &str, rows: i64) -> (deadpool_postgres::Pool, FlagTableSource) {
    let (pool, config) = setup(name).await;
    let client = pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS flag_{name};
             CREATE TABLE flag_{name} (id bigserial PRIMARY KEY, username text NOT NULL,
               event_type text NOT NULL, sent_to_kafka boolean NOT NULL DEFAULT false);
             INSERT INTO flag_{name} (username, event_type)
               SELECT CASE WHEN i % 3 = 0 THEN 'b' ELSE 'a' END, 'login' FROM generate_series(1, {rows}) i;"
        ))
        .await
        .unwrap();
    let source = FlagTableSource::new(
        pool.clone(),
        "test",
        FlagTableConfig {
            table: format!("flag_{name}"),
            topic: "flag_events".into(),
            dead_letter_table: config.dead_letter_table.clone(),
            ..FlagTableConfig::default()
        }
        .validate()
        .unwrap(),
    );
    (pool, source)
}

/// Invariant (per-key order, one relay): a row that a business transaction
/// holds locked is not published, and neither is any later row of its key
/// (they would reach Kafka ahead of it); other keys flow. Once the business
/// transaction ends, the key's rows come in id order.
#[tokio::test]
async fn flag_table_keeps_a_keys_order_past_a_row_locked_by_the_business() {
    let (pool, source) = flag_table("locked_row", 9).await;
    let business = pool.get().await.unwrap();
    // Row 4 is user a's: a business transaction holds it.
    business
        .batch_execute("BEGIN; SELECT * FROM flag_locked_row WHERE id = 4 FOR UPDATE")
        .await
        .unwrap();
    let claimed = source.claim(100).await.unwrap().unwrap();
    let ids = |c: &outbox_core::Claimed<outbox_pg::PgClaim>| -> Vec<uuid::Uuid> {
        c.events.iter().map(|e| e.id).collect()
    };
    let id = |n: i64| outbox_pg::flag_row_event_id("flag_locked_row", n);
    println!(
        "claimed while row 4 is locked: {} of 9 (a: 1,2,4,5,7,8; b: 3,6,9)",
        claimed.events.len()
    );
    assert_eq!(
        ids(&claimed),
        vec![id(1), id(2), id(3), id(6), id(9)],
        "user a's rows after the locked row 4 must wait"
    );
    let acks: Vec<Delivery> = (0..claimed.events.len() as i64).map(ack).collect();
    source.acknowledge(claimed, &acks).await.unwrap();
    business.batch_execute("ROLLBACK").await.unwrap();
    let rest = source.claim(100).await.unwrap().unwrap();
    assert_eq!(ids(&rest), vec![id(4), id(5), id(7), id(8)]);
}

/// A claim does not hold up the business: an update of a claimed row (not
/// of its key) goes through while the claim is open.
#[tokio::test]
async fn flag_table_claims_do_not_block_business_updates() {
    let (pool, source) = flag_table("no_block", 3).await;
    let claimed = source.claim(100).await.unwrap().unwrap();
    let business = pool.get().await.unwrap();
    let started = std::time::Instant::now();
    let updated = business
        .batch_execute(
            "SET statement_timeout = 1000; UPDATE flag_no_block SET event_type = 'logout' WHERE id = 2; \
             RESET statement_timeout",
        )
        .await;
    println!(
        "business update of a claimed row: {:?} after {:?}",
        updated.as_ref().map(|_| "done"),
        started.elapsed()
    );
    assert!(
        updated.is_ok(),
        "the business update waited for the claim: {updated:?}"
    );
    let acks: Vec<Delivery> = (0..claimed.events.len() as i64).map(ack).collect();
    let summary = source.acknowledge(claimed, &acks).await.unwrap();
    assert_eq!(summary.completed, 3);
}

/// Invariant (per-key order across relays): two relays configured with
/// different spellings of one outbox table (`t_x` and `public.t_x`) share
/// its lane locks, so while one holds a key's lane the other claims none of
/// that key's events (it would publish them ahead of the first relay's).
#[tokio::test]
async fn every_spelling_of_the_table_shares_the_lane_locks() {
    let (pool, config) = setup("spelling").await;
    let outbox = Outbox::new(&config);
    let client = pool.get().await.unwrap();
    let events: Vec<Event> = (0..40)
        .map(|i| Event::new("t", format!("e{i}")).with_key("one key"))
        .collect();
    outbox.enqueue(&client, &events).await.unwrap();
    let qualified = OutboxConfig {
        table: format!("public.{}", config.table),
        dead_letter_table: format!("public.{}", config.dead_letter_table),
        ..(*config).clone()
    }
    .validate()
    .unwrap();
    let a = PgOutboxSource::new(pool.clone(), "test", config);
    let b = PgOutboxSource::new(pool.clone(), "test", qualified);
    let first = a.claim(10).await.unwrap();
    let second = b.claim(10).await.unwrap();
    println!(
        "first_claimed={} second_claimed_while_held={}",
        first.as_ref().map_or(0, |c| c.events.len()),
        second.as_ref().map_or(0, |c| c.events.len())
    );
    assert_eq!(first.map(|c| c.events.len()), Some(10));
    assert!(
        second.is_none(),
        "the other spelling claimed the same key's later events while its lane was held"
    );
}

/// Invariant (typed events): a value enqueued with `enqueue_json` in a
/// committed transaction is claimed with its key, its headers and a payload
/// that decodes to the same value; one rolled back is never claimed.
#[tokio::test]
async fn typed_json_events_round_trip() {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Login {
        user: String,
        attempts: u32,
    }
    let (pool, config) = setup("typed").await;
    let outbox = Outbox::new(&config);
    let mut client = pool.get().await.unwrap();
    let value = Login {
        user: "alice".into(),
        attempts: 3,
    };
    let tx = client.transaction().await.unwrap();
    let id = outbox
        .enqueue_json(&tx, "logins", Some("alice"), &value, &[("source", "test")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    outbox
        .enqueue_json(&tx, "logins", Some("bob"), &value, &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let source = PgOutboxSource::new(pool.clone(), "test", config);
    let claimed = source.claim(10).await.unwrap().unwrap();
    assert_eq!(claimed.events.len(), 1);
    let event = &claimed.events[0];
    let decoded: Login = serde_json::from_slice(&event.payload).unwrap();
    println!(
        "id={} key={:?} headers={:?}",
        event.id, event.key, event.headers
    );
    assert_eq!(event.id, id);
    assert_eq!(decoded, value);
    assert_eq!(event.key.as_deref(), Some(&b"alice"[..]));
    assert_eq!(event.headers["content-type"], "application/json");
    assert_eq!(event.headers["source"], "test");
    source.acknowledge(claimed, &[ack(0)]).await.unwrap();
    assert!(source.claim(10).await.unwrap().is_none());
}

/// A pool whose sessions carry `app` as their application name, so that
/// `pg_locks` can be read for them alone.
fn pool_named(app: &str) -> deadpool_postgres::Pool {
    PgConfig {
        application_name: app.into(),
        ..pg_config()
    }
    .create_pool()
    .unwrap()
}

/// Advisory locks held right now by the sessions named `app`.
async fn advisory_locks_of(client: &deadpool_postgres::Client, app: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
             WHERE l.locktype = 'advisory' AND s.application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

/// Invariant (an open claim grows only in its own lanes, past what it took,
/// and loses nothing): while claim A is in flight, events enqueued in A's
/// lanes are invisible to relay B and are taken by A's extension, after A's
/// earlier events of each key; events in other lanes go to B; one
/// acknowledgement of A removes its first and extended events alike, and
/// no lane lock is left on any connection.
#[tokio::test]
async fn an_open_claim_extends_into_its_lanes_only() {
    let (setup_pool, config) = setup("extend").await;
    let app = "outbox-test-extend";
    let pool = pool_named(app);
    let outbox = Outbox::new(&config);
    let client = setup_pool.get().await.unwrap();
    let batch = |from: usize, to: usize| -> Vec<Event> {
        (from..to)
            .map(|i| Event::new("t", format!("k{}:{i}", i % 12)).with_key(format!("k{}", i % 12)))
            .collect()
    };
    outbox.enqueue(&client, &batch(0, 4)).await.unwrap();
    let a = PgOutboxSource::new(pool.clone(), "test", config.clone());
    let b = PgOutboxSource::new(pool.clone(), "test", config);
    let mut claim_a = a.claim(1000).await.unwrap().unwrap();
    assert_eq!(claim_a.events.len(), 4);
    let lane_of = |ids: Vec<uuid::Uuid>| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT event_id, lane FROM t_extend WHERE event_id = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .into_iter()
                .map(|row| (row.get::<_, uuid::Uuid>(0), row.get::<_, i32>(1)))
                .collect::<std::collections::HashMap<_, _>>()
        }
    };
    let lanes_a: std::collections::HashSet<i32> =
        lane_of(claim_a.events.iter().map(|e| e.id).collect())
            .await
            .into_values()
            .collect();
    // 20 more over 12 keys: some in A's lanes, some elsewhere.
    let later = batch(4, 24);
    outbox.enqueue(&client, &later).await.unwrap();
    let later_lanes = lane_of(later.iter().map(|e| e.id).collect()).await;
    let claim_b = b.claim(1000).await.unwrap();
    let b_ids: std::collections::HashSet<uuid::Uuid> = claim_b
        .as_ref()
        .map(|c| c.events.iter().map(|e| e.id).collect())
        .unwrap_or_default();
    let added = a.extend_claim(&mut claim_a, 1000).await.unwrap();
    let extended: Vec<&Event> = claim_a.events[4..].iter().collect();
    let expected_in_a: Vec<uuid::Uuid> = later
        .iter()
        .filter(|e| lanes_a.contains(&later_lanes[&e.id]))
        .map(|e| e.id)
        .collect();
    println!(
        "lanes of A={lanes_a:?}; later events={} of which in A's lanes={}; extension took {added}; B took {}",
        later.len(),
        expected_in_a.len(),
        b_ids.len()
    );
    assert!(!expected_in_a.is_empty() && expected_in_a.len() < later.len());
    assert_eq!(
        extended.iter().map(|e| e.id).collect::<Vec<_>>(),
        expected_in_a,
        "the extension holds the later events of A's lanes, in order"
    );
    assert_eq!(b_ids.len() + added, later.len(), "B took the rest");
    assert!(extended.iter().all(|e| !b_ids.contains(&e.id)));
    // Nothing more to take: a second extension adds nothing.
    assert_eq!(a.extend_claim(&mut claim_a, 1000).await.unwrap(), 0);
    // Each key's events in A come in order.
    let mut last: std::collections::HashMap<String, usize> = Default::default();
    for event in &claim_a.events {
        let payload = String::from_utf8_lossy(&event.payload).to_string();
        let (key, n) = payload.split_once(':').unwrap();
        let n: usize = n.parse().unwrap();
        if let Some(previous) = last.insert(key.to_string(), n) {
            assert!(previous < n, "key {key}: {previous} before {n}");
        }
    }
    let total_a = claim_a.events.len();
    let summary = a
        .acknowledge(claim_a, &(0..total_a as i64).map(ack).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(summary.completed, total_a);
    if let Some(claim_b) = claim_b {
        let n = claim_b.events.len();
        b.acknowledge(claim_b, &(0..n as i64).map(ack).collect::<Vec<_>>())
            .await
            .unwrap();
    }
    let left: i64 = client
        .query_one("SELECT count(*) FROM t_extend", &[])
        .await
        .unwrap()
        .get(0);
    let locks = advisory_locks_of(&client, app).await;
    println!("left in the outbox={left} lane locks held={locks}");
    assert_eq!((left, locks), (0, 0));
}

/// Invariant: a replay in batches moves every dead letter there was when it
/// started back into the outbox, once, in dead-letter order (the outbox's
/// seq follows the dead letters' ids), and not one dead-lettered after it
/// started (a replay must not chase the dead letters it causes).
#[tokio::test]
async fn dead_letters_replay_in_batches_in_order_up_to_their_extent() {
    let (pool, config) = setup("replay_batches").await;
    let client = pool.get().await.unwrap();
    let dead = config.dead_letter_table();
    let insert = |n: i64, reason: &'static str| {
        format!(
            "INSERT INTO {dead} (event_id, topic, payload, created_at, attempts, reason, origin)
             SELECT gen_random_uuid(), 't', convert_to(g::text, 'UTF8'), now(), 1, '{reason}', 'x'
             FROM generate_series(1, {n}) g"
        )
    };
    client.batch_execute(&insert(2500, "old")).await.unwrap();
    let admin = outbox_pg::OutboxAdmin::new(&config);
    let (last, count) = admin.dead_letter_extent(&client).await.unwrap();
    client.batch_execute(&insert(10, "new")).await.unwrap();
    let mut batches = Vec::new();
    loop {
        let moved = admin
            .replay_oldest(&client, last.unwrap(), 1000)
            .await
            .unwrap();
        if moved == 0 {
            break;
        }
        batches.push(moved);
    }
    let in_outbox: Vec<String> = client
        .query(
            &format!(
                "SELECT convert_from(payload, 'UTF8') FROM {} ORDER BY seq",
                config.table()
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let left: Vec<String> = client
        .query(&format!("SELECT reason FROM {dead}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    println!(
        "extent {count} dead letters; batches {batches:?}; outbox {} rows; left {} (all new: {})",
        in_outbox.len(),
        left.len(),
        left.iter().all(|r| r == "new")
    );
    assert_eq!(count, 2500);
    assert_eq!(batches, vec![1000, 1000, 500]);
    let expected: Vec<String> = (1..=2500).map(|i| i.to_string()).collect();
    assert_eq!(in_outbox, expected, "dead-letter order kept");
    assert_eq!(left.len(), 10);
    assert!(left.iter().all(|r| r == "new"));
}
