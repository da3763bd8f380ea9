//! Integration tests of outbox-kafka against a real Kafka-protocol broker.
//!
//! Needs the broker of `scripts/stack.sh up`; override its address with
//! `OUTBOX_KAFKA_BROKERS`. Each test uses its own topic and group.

mod tls;

use std::collections::HashMap;
use std::time::Duration;

use outbox_core::{Bus, Checkpoint, Delivery, Event, Subscription};
use outbox_kafka::{ConsumerConfig, KafkaBus, KafkaConfig, KafkaSubscription};
use uuid::Uuid;

fn kafka() -> KafkaConfig {
    KafkaConfig {
        message_timeout: Duration::from_secs(10),
        ..test_support::kafka()
    }
}

fn unique(name: &str) -> String {
    test_support::unique("it", name)
}

fn consumer_config(group: &str, topic: &str) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(group, [topic]);
    config.session_timeout = Duration::from_secs(6);
    config.max_poll_interval = Duration::from_secs(7);
    config
}

/// Reads until `expected` records arrived or 30 s passed, committing nothing.
async fn read(sub: &mut KafkaSubscription, expected: usize) -> Vec<outbox_core::Record> {
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while records.len() < expected && tokio::time::Instant::now() < deadline {
        records.extend(
            sub.poll_batch(1000, Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    records
}

/// Events of `published` (in publishing order) whose key's previous event
/// is on another partition or not at a lower offset.
fn out_of_order(published: &[Event], position_of: &HashMap<Uuid, outbox_core::Position>) -> usize {
    let mut last_of_key: HashMap<Vec<u8>, outbox_core::Position> = HashMap::new();
    let mut out_of_order = 0;
    for event in published {
        let position = position_of[&event.id];
        let key = event.key.clone().unwrap().to_vec();
        if let Some(last) = last_of_key.insert(key, position) {
            if last.partition != position.partition || last.offset >= position.offset {
                out_of_order += 1;
            }
        }
    }
    out_of_order
}

/// Invariant: every event of a batch gets the broker's answer; keys keep one
/// partition and their order; the event id travels in the header.
#[tokio::test]
async fn publishes_a_batch_and_reports_each_delivery() {
    let topic = unique("publish");
    let bus = KafkaBus::new(kafka()).unwrap();
    let events: Vec<Event> = (0..300)
        .map(|i| {
            Event::new(topic.clone(), format!("{i}"))
                .with_key(format!("key{}", i % 7))
                .with_header("app", "test")
        })
        .collect();
    let deliveries = bus.publish(&events).await.unwrap();
    assert_eq!(deliveries.len(), 300);
    let mut partition_of_key: HashMap<String, i32> = HashMap::new();
    let mut last_offset: HashMap<i32, i64> = HashMap::new();
    for (event, delivery) in events.iter().zip(&deliveries) {
        let Delivery::Acknowledged(position) = delivery else {
            panic!("not acknowledged: {delivery:?}");
        };
        let key = String::from_utf8(event.key.clone().unwrap().to_vec()).unwrap();
        assert_eq!(
            *partition_of_key.entry(key).or_insert(position.partition),
            position.partition
        );
        let last = last_offset.entry(position.partition).or_insert(-1);
        assert!(
            position.offset > *last,
            "offsets must grow in publish order"
        );
        *last = position.offset;
    }

    let mut sub = KafkaSubscription::new(&kafka(), consumer_config(&unique("g"), &topic)).unwrap();
    let records = read(&mut sub, 300).await;
    println!("published=300 acknowledged=300 read={}", records.len());
    assert_eq!(records.len(), 300);
    let by_id: HashMap<Uuid, &Event> = events.iter().map(|e| (e.id, e)).collect();
    for record in &records {
        let decoded = record.to_event().unwrap();
        let original = by_id[&decoded.id];
        assert_eq!(decoded.payload, original.payload);
        assert_eq!(decoded.headers.get("app").map(String::as_str), Some("test"));
        assert_eq!(decoded.created_at_ms(), original.created_at_ms());
    }
}

/// Invariant: batches published at the same time (each on a producer of
/// its own, four batches on two producers) are each acknowledged whole, and
/// a key keeps its order across rounds whichever producer carried it.
#[tokio::test]
async fn concurrent_publishes_are_acknowledged_and_keep_each_keys_order() {
    let topic = unique("concurrent");
    let bus = KafkaBus::new(KafkaConfig {
        producers: 2,
        ..kafka()
    })
    .unwrap();
    let mut published = Vec::new();
    let mut position_of: HashMap<Uuid, outbox_core::Position> = HashMap::new();
    for round in 0..2 {
        let batches: Vec<Vec<Event>> = (0..4)
            .map(|batch| {
                (0..100)
                    .map(|i| {
                        Event::new(topic.clone(), format!("{round}-{batch}-{i}"))
                            .with_key(format!("b{batch}-k{}", i % 5))
                    })
                    .collect()
            })
            .collect();
        let answers =
            futures::future::join_all(batches.iter().map(|events| bus.publish(events))).await;
        for (events, answer) in batches.iter().zip(answers) {
            for (event, delivery) in events.iter().zip(answer.unwrap()) {
                let Delivery::Acknowledged(position) = delivery else {
                    panic!("not acknowledged: {delivery:?}");
                };
                position_of.insert(event.id, position);
            }
        }
        published.extend(batches.into_iter().flatten());
    }
    let out_of_order = out_of_order(&published, &position_of);
    let mut sub = KafkaSubscription::new(&kafka(), consumer_config(&unique("g"), &topic)).unwrap();
    let records = read(&mut sub, published.len()).await;
    println!(
        "published={} acknowledged={} out_of_order={out_of_order} read={}",
        published.len(),
        position_of.len(),
        records.len()
    );
    assert_eq!(position_of.len(), published.len());
    assert_eq!(out_of_order, 0);
    assert_eq!(records.len(), published.len());
}

/// Invariant: small batches (through the small-batch producer, or the pool
/// when it is busy) and large ones (through the pool) are all acknowledged
/// whole, and a key keeps its order across batches whichever producer
/// carried each: rounds of three small batches at once, then one large.
#[tokio::test]
async fn small_and_large_batches_keep_each_keys_order() {
    let topic = unique("small_batches");
    let bus = KafkaBus::new(KafkaConfig {
        producers: 2,
        small_batch_events: 50,
        ..kafka()
    })
    .unwrap();
    let event = |round: usize, batch: usize, i: usize| {
        Event::new(topic.clone(), format!("{round}-{batch}-{i}")).with_key(format!("k{}", i % 9))
    };
    let mut published = Vec::new();
    let mut position_of: HashMap<Uuid, outbox_core::Position> = HashMap::new();
    for round in 0..3 {
        // Three small batches at once carry distinct keys (as a relay's
        // concurrent batches do); the large one after them, every key.
        let small: Vec<Vec<Event>> = (0..3)
            .map(|batch| {
                (0..20)
                    .map(|i| event(round, batch, i * 3 + batch))
                    .collect()
            })
            .collect();
        let large: Vec<Event> = (0..120).map(|i| event(round, 9, i)).collect();
        let answers =
            futures::future::join_all(small.iter().map(|events| bus.publish(events))).await;
        let large_answer = bus.publish(&large).await;
        for (events, answer) in small
            .iter()
            .chain(std::iter::once(&large))
            .zip(answers.into_iter().chain(std::iter::once(large_answer)))
        {
            for (event, delivery) in events.iter().zip(answer.unwrap()) {
                let Delivery::Acknowledged(position) = delivery else {
                    panic!("not acknowledged: {delivery:?}");
                };
                position_of.insert(event.id, position);
            }
        }
        // A key's order is the order of publishing: the small batches of a
        // round (disjoint keys), then the large one.
        published.extend(small.into_iter().flatten());
        published.extend(large);
    }
    let out_of_order = out_of_order(&published, &position_of);
    println!(
        "published={} acknowledged={} out_of_order={out_of_order}",
        published.len(),
        position_of.len()
    );
    assert_eq!(position_of.len(), published.len());
    assert_eq!(out_of_order, 0);
}

/// Invariant (a batch that grows in flight keeps each key's order): parts
/// handed to a growing publish while the earlier parts are still on their
/// way (the bus has two producers, so parts on different producers could
/// overtake each other) are all acknowledged, and every key's offsets grow
/// in the order the events were handed over.
#[tokio::test]
async fn a_growing_publish_keeps_each_keys_order_across_parts_in_flight() {
    let topic = unique("growing");
    let bus = KafkaBus::new(KafkaConfig {
        producers: 2,
        ..kafka()
    })
    .unwrap();
    let part = |n: usize| -> Vec<Event> {
        (0..150)
            .map(|i| Event::new(topic.clone(), format!("{n}-{i}")).with_key(format!("k{}", i % 5)))
            .collect()
    };
    let first = part(0);
    let (parts, more) = tokio::sync::mpsc::channel(8);
    let mut published = first.clone();
    let later: Vec<Vec<Event>> = (1..6).map(part).collect();
    for events in &later {
        published.extend(events.iter().cloned());
    }
    let feeder = async move {
        for events in later {
            parts.send(events).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let (answers, ()) = tokio::join!(bus.publish_growing(&first, more), feeder);
    let answers = answers.unwrap();
    assert_eq!(answers.len(), published.len());
    let mut last_of_key: HashMap<Vec<u8>, outbox_core::Position> = HashMap::new();
    let (mut acknowledged, mut out_of_order) = (0, 0);
    for (event, delivery) in published.iter().zip(&answers) {
        let Delivery::Acknowledged(position) = delivery else {
            continue;
        };
        acknowledged += 1;
        let key = event.key.clone().unwrap().to_vec();
        if let Some(last) = last_of_key.insert(key, *position) {
            if last.partition != position.partition || last.offset >= position.offset {
                out_of_order += 1;
            }
        }
    }
    let mut sub = KafkaSubscription::new(&kafka(), consumer_config(&unique("g"), &topic)).unwrap();
    let records = read(&mut sub, published.len()).await;
    println!(
        "published={} in 6 parts, acknowledged={acknowledged} out_of_order={out_of_order} read={}",
        published.len(),
        records.len()
    );
    assert_eq!(acknowledged, published.len());
    assert_eq!(out_of_order, 0);
    assert_eq!(records.len(), published.len());
}

/// Invariant (no loss, payloads intact): whatever the producer's
/// compression, every event published is read back with its payload, key
/// and headers. Snappy is left out: tansu 0.6 cannot serve it back.
#[tokio::test]
async fn every_compression_round_trips() {
    use outbox_kafka::Compression;
    for compression in [
        Compression::None,
        Compression::Lz4,
        Compression::Gzip,
        Compression::Zstd,
    ] {
        let topic = unique(&format!("compression_{compression}"));
        let config = KafkaConfig {
            compression,
            ..kafka()
        };
        let bus = KafkaBus::new(config.clone()).unwrap();
        let events: Vec<Event> = (0..200)
            .map(|i| {
                Event::new(
                    topic.clone(),
                    format!("{{\"n\":{i},\"pad\":\"{}\"}}", "y".repeat(i)),
                )
                .with_key(format!("key{}", i % 5))
                .with_header("codec", compression.as_str())
            })
            .collect();
        let deliveries = bus.publish(&events).await.unwrap();
        let acknowledged = deliveries.iter().filter(|d| d.is_acknowledged()).count();
        let mut sub =
            KafkaSubscription::new(&config, consumer_config(&unique("g"), &topic)).unwrap();
        let records = read(&mut sub, events.len()).await;
        println!(
            "compression={compression} published={} acknowledged={acknowledged} read={}",
            events.len(),
            records.len()
        );
        assert_eq!(acknowledged, events.len(), "{compression}: {deliveries:?}");
        assert_eq!(records.len(), events.len(), "{compression}");
        let by_id: HashMap<Uuid, &Event> = events.iter().map(|e| (e.id, e)).collect();
        for record in &records {
            let decoded = record.to_event().unwrap();
            let original = by_id[&decoded.id];
            assert_eq!(decoded.payload, original.payload, "{compression}");
            assert_eq!(decoded.key, original.key, "{compression}");
            assert_eq!(
                decoded.headers.get("codec").map(String::as_str),
                Some(compression.as_str())
            );
        }
    }
}

/// Invariant (poison isolated): an event the broker can never take is
/// reported as rejected, and the other events of its batch are delivered.
#[tokio::test]
async fn too_large_event_is_rejected_and_the_rest_delivered() {
    let topic = unique("too_large");
    let bus = KafkaBus::new(kafka()).unwrap();
    let events = vec![
        Event::new(topic.clone(), "small"),
        Event::new(topic.clone(), vec![b'x'; 3 * 1024 * 1024]),
        Event::new(topic.clone(), "small again"),
    ];
    let deliveries = bus.publish(&events).await.unwrap();
    println!("{deliveries:?}");
    assert!(deliveries[0].is_acknowledged());
    assert!(matches!(&deliveries[1], Delivery::Rejected(reason) if reason.contains("too large")));
    assert!(deliveries[2].is_acknowledged());
}

/// Invariant: positions move only on commit. Records read but not committed
/// are read again by the next member of the group; committed ones are not.
#[tokio::test]
async fn positions_move_only_when_committed() {
    let topic = unique("commit");
    let group = unique("group");
    let bus = KafkaBus::new(KafkaConfig {
        topic_partitions: 1,
        ..kafka()
    })
    .unwrap();
    let events: Vec<Event> = (0..50)
        .map(|i| Event::new(topic.clone(), format!("{i}")))
        .collect();
    assert!(bus
        .publish(&events)
        .await
        .unwrap()
        .iter()
        .all(Delivery::is_acknowledged));

    let mut first = KafkaSubscription::new(&kafka(), consumer_config(&group, &topic)).unwrap();
    let seen = read(&mut first, 50).await;
    assert_eq!(seen.len(), 50);
    drop(first); // no commit: like a consumer killed before its commit

    let mut second = KafkaSubscription::new(&kafka(), consumer_config(&group, &topic)).unwrap();
    let again = read(&mut second, 50).await;
    assert_eq!(again.len(), 50, "uncommitted records must be read again");
    let mut checkpoint = Checkpoint::new();
    checkpoint.advance(&topic, 0, 30);
    second.commit(&checkpoint).await.unwrap();
    // Async commit: give it a moment to reach the broker before leaving.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(second);

    let mut third = KafkaSubscription::new(&kafka(), consumer_config(&group, &topic)).unwrap();
    let rest = read(&mut third, 20).await;
    println!(
        "first_read=50 reread_uncommitted={} after_commit_at_30={}",
        again.len(),
        rest.len()
    );
    assert_eq!(rest.len(), 20);
    assert_eq!(rest[0].position.offset, 30);
}

#[tokio::test]
async fn unreachable_broker_is_named_in_the_error() {
    let bus = KafkaBus::new(KafkaConfig {
        brokers: "127.0.0.1:1".into(),
        ..kafka()
    })
    .unwrap();
    let err = bus.check_connection().await.unwrap_err();
    let text = err.to_string();
    println!("{text}");
    assert!(err.is_retryable());
    assert!(text.contains("kafka at 127.0.0.1:1"), "{text}");
    assert!(text.contains("is the broker running"), "{text}");
}

/// Invariant (poison isolated, innocents flow): a refusal shared by several
/// events of a batch is not believed until each was sent alone; then only
/// the events refused alone are rejected. Here the producer's own size
/// limit refuses two oversized events among accepted ones.
#[tokio::test]
async fn refusals_shared_by_a_batch_are_confirmed_one_event_at_a_time() {
    let topic = unique("isolate");
    let mut config = kafka();
    config
        .extra
        .insert("message.max.bytes".into(), "10000".into());
    let bus = KafkaBus::new(config).unwrap();
    let big = "x".repeat(20_000);
    let events = vec![
        Event::new(topic.clone(), "small 1").with_key("a"),
        Event::new(topic.clone(), big.clone()).with_key("b"),
        Event::new(topic.clone(), "small 2").with_key("c"),
        Event::new(topic.clone(), big).with_key("d"),
    ];
    let first = bus.publish(&events).await.unwrap();
    let kinds = |d: &[Delivery]| -> Vec<&'static str> {
        d.iter()
            .map(|d| match d {
                Delivery::Acknowledged(_) => "acked",
                Delivery::Retryable(_) => "retryable",
                Delivery::Rejected(_) => "rejected",
            })
            .collect()
    };
    println!("first publish: {:?}", kinds(&first));
    assert_eq!(
        kinds(&first),
        vec!["acked", "retryable", "acked", "retryable"]
    );
    let again = bus
        .publish(&[events[1].clone(), events[3].clone()])
        .await
        .unwrap();
    println!("each alone: {:?}", kinds(&again));
    assert_eq!(kinds(&again), vec!["rejected", "rejected"]);
}

/// The value of `outbox_consumer_lag{topic, partition}` in `rendered`.
fn lag_gauge(rendered: &str, topic: &str, partition: i32) -> Option<f64> {
    let labels = format!("topic=\"{topic}\",partition=\"{partition}\"");
    rendered
        .lines()
        .filter(|line| line.starts_with("outbox_consumer_lag{"))
        .find(|line| line.contains(&labels))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Invariant (the lag an operator alerts on is true and fresh): the gauge
/// `outbox_consumer_lag` that `LagProbe::report_every` keeps shows, per
/// partition, the records the group has not committed, and follows a
/// later commit without anything else being called.
#[tokio::test]
async fn the_lag_gauge_counts_what_the_group_has_not_committed() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    let topic = unique("lag");
    let group = unique("group");
    let config = KafkaConfig {
        topic_partitions: 2,
        ..kafka()
    };
    let bus = KafkaBus::new(config.clone()).unwrap();
    let events: Vec<Event> = (0..40)
        .map(|i| Event::new(topic.clone(), format!("{i}")).with_key(format!("k{i}")))
        .collect();
    let deliveries = bus.publish(&events).await.unwrap();
    let mut per_partition: HashMap<i32, i64> = HashMap::new();
    for delivery in &deliveries {
        let Delivery::Acknowledged(position) = delivery else {
            panic!("not acknowledged: {delivery:?}");
        };
        *per_partition.entry(position.partition).or_default() += 1;
    }

    // The group commits everything of partition 0, nothing of partition 1.
    let mut sub = KafkaSubscription::new(&config, consumer_config(&group, &topic)).unwrap();
    assert_eq!(read(&mut sub, 40).await.len(), 40);
    let zero = per_partition.get(&0).copied().unwrap_or(0);
    let one = per_partition.get(&1).copied().unwrap_or(0);
    sub.commit(&Checkpoint::from_iter([(topic.as_str(), 0, zero)]))
        .await
        .unwrap();

    let stop = tokio_util::sync::CancellationToken::new();
    let probe = outbox_kafka::LagProbe::new(&config, &group, &topic).unwrap();
    let reporting = tokio::spawn(probe.report_every(Duration::from_millis(200), stop.clone()));
    let until = |want: (f64, f64)| {
        let handle = handle.clone();
        let topic = topic.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let rendered = handle.render();
                let seen = (
                    lag_gauge(&rendered, &topic, 0),
                    lag_gauge(&rendered, &topic, 1),
                );
                if seen == (Some(want.0), Some(want.1)) || tokio::time::Instant::now() > deadline {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let before = until((0.0, one as f64)).await;
    sub.commit(&Checkpoint::from_iter([(topic.as_str(), 1, one)]))
        .await
        .unwrap();
    let after = until((0.0, 0.0)).await;
    stop.cancel();
    reporting.await.unwrap();
    println!(
        "records p0={zero} p1={one} gauge_after_committing_p0={before:?} gauge_after_committing_p1={after:?}"
    );
    assert!(zero > 0 && one > 0, "both partitions got records");
    assert_eq!(before, (Some(0.0), Some(one as f64)));
    assert_eq!(after, (Some(0.0), Some(0.0)));
}
