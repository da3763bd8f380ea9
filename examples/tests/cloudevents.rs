//! CloudEvents through the pipeline: the relay publishes in the Kafka
//! protocol binding (binary mode), and the consumer takes records of a
//! producer that speaks only CloudEvents.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use outbox_core::{Event, Position, Record};
use outbox_pg::{Outbox, OutboxConfig};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// RFC 3339 UTC (`2024-05-01T09:00:00.123Z`) as milliseconds since the epoch.
fn rfc3339_ms(text: &str) -> i64 {
    let format = time::format_description::well_known::Rfc3339;
    let at = time::OffsetDateTime::parse(text, &format).unwrap();
    assert_eq!(at.offset(), time::UtcOffset::UTC, "{text} is not in UTC");
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap()
}

/// Invariants: (relay) every event published with `--cloudevents-source`
/// carries `ce_specversion` 1.0, `ce_id` = its event id, `ce_source`,
/// `ce_type` (the topic, or the event's own), `ce_time` = its creation time
/// and its `content-type`; (consumer) records of a producer that sends only
/// `ce_*` headers are written once each, a copy sent again is skipped (the
/// id comes from `ce_source` and `ce_id`): `count()` = `uniqExact(event_id)`
/// = distinct events.
#[tokio::test]
async fn cloudevents_round_trip_through_the_pipeline() {
    let name = unique("ce");
    let pool = pg().create_pool().unwrap();
    let config = OutboxConfig {
        table: name.clone(),
        dead_letter_table: format!("{name}_dead"),
        ..OutboxConfig::default()
    }
    .validate()
    .unwrap();
    let client = pool.get().await.unwrap();
    outbox_pg::migrate(&client, &config).await.unwrap();
    let mut events: Vec<Event> = (0..3)
        .map(|i| {
            Event::json(&name, &serde_json::json!({"order": i}))
                .unwrap()
                .with_key(format!("o{i}"))
        })
        .collect();
    events.push(
        Event::json(&name, &serde_json::json!({"order": 9}))
            .unwrap()
            .with_key("o9")
            .with_header("ce_type", "com.example.order.cancelled")
            .with_header("ce_subject", "order-9"),
    );
    Outbox::new(&config)
        .enqueue(&client, &events)
        .await
        .unwrap();

    // A producer of another team that speaks CloudEvents only; it sends
    // order-1 twice (a retry).
    let foreign: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    outbox_kafka::ensure_topics(&kafka(&brokers()), &[name.as_str()])
        .await
        .unwrap();
    let foreign_headers = |id: &str| {
        OwnedHeaders::new()
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some(id),
            })
            .insert(Header {
                key: "ce_source",
                value: Some("/legacy-shop"),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("com.example.order.placed"),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            })
    };
    for id in ["order-1", "order-2", "order-1"] {
        let payload = format!("{{\"legacy\":\"{id}\"}}");
        foreign
            .send(
                FutureRecord::to(&name)
                    .key(id)
                    .payload(&payload)
                    .headers(foreign_headers(id)),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    let mut relay = command("producer_pg_to_kafka")
        .args(["--source", "outbox", "--outbox-table", &name])
        .args(["--dead-letter-table", &format!("{name}_dead")])
        .args([
            "--cloudevents-source",
            "/e2e-shop",
            "--cloudevents-topic",
            &name,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let mut consumer = command("consumer_to_clickhouse")
        .args(["--topic", &name, "--clickhouse-table", &name])
        .args(["--group-id", &unique("g"), "--format", "raw"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    within(Duration::from_secs(60), "six rows in ClickHouse", async {
        while ch_query(&format!("EXISTS TABLE `{name}` FORMAT TabSeparated")).await != "1"
            || ch_count(&name).await < 6
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    // Time for the duplicate to arrive and be skipped, had it been missed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for child in [&mut relay.0, &mut consumer.0] {
        let status = terminate(child, Duration::from_secs(15));
        assert!(matches!(status, Some(s) if s.success()), "{status:?}");
    }
    let (rows, distinct) = ch_counts(&name).await;
    println!("rows={rows} distinct_event_ids={distinct} (4 relayed, 2 foreign, 1 foreign copy)");
    assert_eq!((rows, distinct), (6, 6));

    let listed = ch_query(&format!(
        "SELECT toString(event_id), headers FROM `{name}` ORDER BY kafka_partition, kafka_offset FORMAT TabSeparated"
    ))
    .await;
    let stored: BTreeMap<String, BTreeMap<String, String>> = listed
        .lines()
        .map(|line| {
            let (id, headers) = line.split_once('\t').unwrap();
            // TabSeparated escapes backslashes; the JSON has none here.
            (id.to_string(), serde_json::from_str(headers).unwrap())
        })
        .collect();
    for event in &events {
        let headers = &stored[&event.id.to_string()];
        println!("relayed {}: {headers:?}", event.id);
        assert_eq!(headers["ce_specversion"], "1.0");
        assert_eq!(headers["ce_id"], event.id.to_string());
        assert_eq!(headers["ce_source"], "/e2e-shop");
        let expected_type = event.headers.get("ce_type").unwrap_or(&name);
        assert_eq!(&headers["ce_type"], expected_type);
        assert_eq!(rfc3339_ms(&headers["ce_time"]), event.created_at_ms());
        assert_eq!(headers["content-type"], "application/json");
    }
    assert_eq!(stored[&events[3].id.to_string()]["ce_subject"], "order-9");
    for id in ["order-1", "order-2"] {
        let record = Record {
            topic: name.clone(),
            position: Position {
                partition: 0,
                offset: 0,
            },
            key: None,
            payload: None,
            headers: [("ce_source", "/legacy-shop"), ("ce_id", id)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timestamp_ms: None,
        };
        let event_id = record.event_id().unwrap().to_string();
        assert_eq!(
            stored[&event_id]["ce_id"], id,
            "{id} stored under its derived id"
        );
    }
    let _ = client
        .batch_execute(&format!("DROP TABLE {name}; DROP TABLE {name}_dead;"))
        .await;
}
