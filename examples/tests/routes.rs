//! Routes end to end: one consumer process writes two topics into two
//! existing tables of their own shape, from the configuration file alone.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use outbox_core::Event;
use outbox_kafka::KafkaBus;

const META: &str = "event_id UUID, kafka_partition Int32, kafka_offset Int64, ingested_at DateTime";

/// Invariant (no loss, no duplicate, per route, with the consumer killed
/// with SIGKILL at random points): each of two routes in one process ends
/// with every event of its topic exactly once in its table, with the values
/// of the payload (nested fields and renames from the route), and its one
/// poison record dead-lettered with the column and the reason.
#[tokio::test]
async fn two_routes_in_one_consumer_write_each_event_once_through_kills() {
    let views = unique("views");
    let orders = unique("orders");
    ch_query(&format!(
        "CREATE TABLE `{views}` (url String, user String, ms UInt32, {META}) \
         ENGINE = ReplacingMergeTree() ORDER BY (kafka_partition, kafka_offset)"
    ))
    .await;
    ch_query(&format!(
        "CREATE TABLE `{orders}` (id UInt64, amount Decimal(18, 2), city String, \
         placed DateTime, {META}) ENGINE = ReplacingMergeTree() ORDER BY (kafka_partition, kafka_offset)"
    ))
    .await;
    let bus = KafkaBus::new(kafka(&brokers())).unwrap();
    let (per_topic, chunk) = (1_500usize, 300usize);
    let mut amount_cents: u64 = 0;
    for start in (0..per_topic).step_by(chunk) {
        let mut events = Vec::new();
        for i in start..start + chunk {
            let user = format!("u{}", i % 13);
            let view = format!(r#"{{"path": "/p/{i}", "who": "{user}", "ms": {i}}}"#);
            events.push(Event::new(views.clone(), view).with_key(user.clone()));
            // The 700th order's amount does not fit Decimal(18, 2): poison.
            let amount = if i == 700 {
                "1.001".to_string()
            } else {
                amount_cents += i as u64 * 100 + 5;
                format!("{}.{:02}", i, 5)
            };
            let order = format!(
                r#"{{"id": {i}, "amount": "{amount}", "address": {{"city": "c{}"}}, "placed": "2026-12-05T10:00:00Z"}}"#,
                i % 7
            );
            events.push(Event::new(orders.clone(), order).with_key(user));
        }
        let deliveries = outbox_core::Bus::publish(&bus, &events).await.unwrap();
        assert!(deliveries.iter().all(|d| d.is_acknowledged()));
    }
    // One poison view too: not a JSON object.
    let poison = Event::new(views.clone(), "[1, 2, 3]");
    outbox_core::Bus::publish(&bus, std::slice::from_ref(&poison))
        .await
        .unwrap();

    let config = std::env::temp_dir().join(format!("{views}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"group_id = "{group}"
batch_size = 200

[[route]]
topic = "{views}"
table = "{views}"
fields = {{ url = "path", user = "who" }}

[[route]]
topic = "{orders}"
table = "default.{orders}"
fields = {{ city = "/address/city" }}
batch_size = 150
"#,
            group = unique("routes")
        ),
    )
    .unwrap();
    let spawn = || {
        command("consumer_to_clickhouse")
            .args(["--config".as_ref(), config.as_os_str()])
            .args(["--session-timeout-ms", "6000", "--format", "table"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let total = |views_rows: u64, orders_rows: u64| views_rows + orders_rows;
    let expected_views = per_topic as u64; // + 1 poison, dead-lettered
    let expected_orders = per_topic as u64 - 1;
    let mut kills = 0;
    for round in 0..5u64 {
        let before = total(ch_count(&views).await, ch_count(&orders).await);
        let mut child = spawn();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while total(ch_count(&views).await, ch_count(&orders).await) == before
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(10 + (round * 41) % 70)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        if ch_count(&views).await >= expected_views && ch_count(&orders).await >= expected_orders {
            break;
        }
    }
    let mut last = spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while (ch_count(&views).await < expected_views || ch_count(&orders).await < expected_orders)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // anything extra would land now
    let status = terminate(&mut last, Duration::from_secs(20));
    let _ = std::fs::remove_file(&config);

    let (view_rows, view_ids) = ch_counts(&views).await;
    let (order_rows, order_ids) = ch_counts(&orders).await;
    let dead = ch_query(&format!(
        "SELECT topic, reason FROM outbox_dead_letter WHERE topic IN ('{views}', '{orders}') \
         ORDER BY topic FORMAT TabSeparated"
    ))
    .await;
    let values = ch_query(&format!(
        "SELECT (SELECT toString(sum(amount)) FROM `{orders}`), \
                (SELECT uniqExact(city) FROM `{orders}`), \
                (SELECT countIf(url = concat('/p/', toString(ms))) FROM `{views}`), \
                (SELECT uniqExact(user) FROM `{views}`) FORMAT TabSeparated"
    ))
    .await;
    println!(
        "kills={kills} views: published={} rows={view_rows} distinct={view_ids}; \
         orders: published={per_topic} rows={order_rows} distinct={order_ids}; \
         values(sum amount, cities, urls matching, users)={values}\ndead letters:\n{dead}",
        per_topic + 1
    );
    assert!(
        matches!(status, Some(s) if s.success()),
        "consumer must stop cleanly on SIGTERM: {status:?}"
    );
    assert_eq!((view_rows, view_ids), (expected_views, expected_views));
    assert_eq!((order_rows, order_ids), (expected_orders, expected_orders));
    let expected_sum = format!("{}.{:02}", amount_cents / 100, amount_cents % 100);
    assert_eq!(
        values,
        format!("{expected_sum}\t7\t{expected_views}\t13"),
        "values from renamed and nested fields"
    );
    let dead: Vec<&str> = dead.lines().collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead.iter()
            .any(|l| l.starts_with(orders.as_str()) && l.contains("column \"amount\"")),
        "{dead:?}"
    );
    assert!(
        dead.iter()
            .any(|l| l.starts_with(views.as_str()) && l.contains("not a JSON object")),
        "{dead:?}"
    );
}

/// Invariant (a failing table stalls only its own route): one route's table
/// refuses every insert holding a given row (a column whose expression
/// throws), which the sink treats as retryable; the other route writes all
/// its events meanwhile, and once the table is fixed the stalled route
/// resumes and writes each of its events once. (Readiness) while it is
/// stalled, `/readyz` answers 503 naming the failing route's sink at every
/// look, however often the healthy route writes.
#[tokio::test]
async fn a_failing_table_stalls_only_its_own_route() {
    let healthy = unique("healthy");
    let failing = unique("failing");
    ch_query(&format!(
        "CREATE TABLE `{healthy}` (n UInt32, {META}) \
         ENGINE = ReplacingMergeTree() ORDER BY (kafka_partition, kafka_offset)"
    ))
    .await;
    ch_query(&format!(
        "CREATE TABLE `{failing}` (n UInt32, guard UInt8 MATERIALIZED throwIf(n = 13), {META}) \
         ENGINE = ReplacingMergeTree() ORDER BY (kafka_partition, kafka_offset)"
    ))
    .await;
    let bus = KafkaBus::new(kafka(&brokers())).unwrap();
    let per_topic = 300u64;
    let events: Vec<Event> = (0..per_topic)
        .flat_map(|n| {
            [
                Event::new(healthy.clone(), format!(r#"{{"n": {n}}}"#))
                    .with_key(format!("k{}", n % 5)),
                Event::new(failing.clone(), format!(r#"{{"n": {n}}}"#))
                    .with_key(format!("k{}", n % 5)),
            ]
        })
        .collect();
    let deliveries = outbox_core::Bus::publish(&bus, &events).await.unwrap();
    assert!(deliveries.iter().all(|d| d.is_acknowledged()));
    let config = std::env::temp_dir().join(format!("{healthy}.toml"));
    std::fs::write(
        &config,
        format!(
            "group_id = \"{group}\"\n\n[[route]]\ntopic = \"{healthy}\"\ntable = \"{healthy}\"\n\n\
             [[route]]\ntopic = \"{failing}\"\ntable = \"{failing}\"\n",
            group = unique("isolation")
        ),
    )
    .unwrap();
    let metrics_port = free_port();
    let mut consumer = command("consumer_to_clickhouse")
        .args(["--config".as_ref(), config.as_os_str()])
        .args(["--session-timeout-ms", "6000"])
        .env("OUTBOX_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    within(Duration::from_secs(60), "the healthy route's rows", async {
        while ch_count(&healthy).await < per_topic {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    // Once the failing route has failed (its first batches, without the
    // poisoned row, may have been written), the healthy route keeps
    // writing while /readyz is looked at.
    let failing_route = format!("{failing} → default.{failing}: sink: down");
    let readyz = format!("http://127.0.0.1:{metrics_port}/readyz");
    within(
        Duration::from_secs(30),
        "the failing route's first failure",
        async {
            while !http_get(&readyz).await.1.contains(&failing_route) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    let more = 40u64;
    let looks = async {
        let mut answers = Vec::new();
        for _ in 0..16 {
            answers.push(http_get(&readyz).await);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        answers
    };
    let writes = async {
        for n in 0..more {
            let event = Event::new(healthy.clone(), format!(r#"{{"n": {}}}"#, per_topic + n))
                .with_key(format!("k{}", n % 5));
            let acked = outbox_core::Bus::publish(&bus, &[event]).await.unwrap();
            assert!(acked[0].is_acknowledged());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (answers, ()) = tokio::join!(looks, writes);
    let ready_looks = answers.iter().filter(|(status, _)| *status == 200).count();
    println!(
        "/readyz while one route is stalled: {ready_looks} of {} looks said ready; last: {:?}",
        answers.len(),
        answers.last()
    );
    for (status, body) in &answers {
        assert_eq!(*status, 503, "{body}");
        assert!(body.contains(&failing_route), "{body}");
    }
    let stalled = ch_count(&failing).await;
    let running = consumer.try_wait().unwrap().is_none();
    ch_query(&format!(
        "ALTER TABLE `{failing}` MODIFY COLUMN guard UInt8 MATERIALIZED 0"
    ))
    .await;
    within(
        Duration::from_secs(60),
        "the failing route's rows once fixed",
        async {
            while ch_count(&failing).await < per_topic {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = terminate(&mut consumer, Duration::from_secs(20));
    let _ = std::fs::remove_file(&config);
    let (healthy_rows, healthy_ids) = ch_counts(&healthy).await;
    let (failing_rows, failing_ids) = ch_counts(&failing).await;
    println!(
        "healthy route: {healthy_rows} rows ({healthy_ids} distinct) while the other was stalled at \
         {stalled} of {per_topic}; consumer running then: {running}; after the fix: {failing_rows} rows \
         ({failing_ids} distinct)"
    );
    assert!(running, "a failing table must not stop the process");
    assert!(
        stalled < per_topic,
        "the failing route wrote every row: {stalled}"
    );
    assert_eq!(
        (healthy_rows, healthy_ids),
        (per_topic + more, per_topic + more)
    );
    assert_eq!((failing_rows, failing_ids), (per_topic, per_topic));
    assert!(matches!(status, Some(s) if s.success()), "{status:?}");
}
