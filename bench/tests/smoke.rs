//! The benchmark's smoke run (`--size smoke`) against the local stack: every
//! phase runs and the report is complete and valid. No figure is asserted:
//! speed is for `make bench` to show, not for tests to time.

use std::process::Command;

/// Every number the report must hold (issue #5's keys, plus the claim-cost
/// and 5k-events/s latency figures, the WAL source's, and the table-driven
/// encoder's).
const KEYS: [&str; 41] = [
    "raw_produce_eps",
    "raw_consume_eps",
    "raw_insert_rps",
    "raw_claim_eps",
    "naive_relay_eps",
    "relay_eps",
    "relay3_eps",
    "sink_rps",
    "typed_mapper_rps",
    "table_rows_rps",
    "table_rows_vs_typed",
    "relay_startup_s",
    "relay3_startup_s",
    "sink_startup_s",
    "e2e_p50_ms",
    "e2e_p99_ms",
    "e2e_max_ms",
    "e2e_5k_p50_ms",
    "e2e_5k_p99_ms",
    "e2e_5k_max_ms",
    "e2e_kafka_p50_ms",
    "e2e_kafka_p99_ms",
    "e2e_cpu_busy_pct",
    "relay_rss_mb",
    "relay3_rss_mb",
    "consumer_rss_mb",
    "claim_ms_empty",
    "claim_ms_after_backlog",
    "claim_ms_after_vacuum",
    "relay_vs_naive",
    "relay_vs_limit",
    "relay3_vs_limit",
    "sink_vs_limit",
    "claim_after_vs_empty",
    "claim_vacuumed_vs_empty",
    "wal_relay_eps",
    "wal_relay_pg_cpu_s_per_1k",
    "relay_pg_cpu_s_per_1k",
    "wal_e2e_p99_ms",
    "wal_relay_vs_raw_produce",
    "wal_e2e_p99_vs_floor",
];

/// The broker of the local stack, as the bench binary reaches it.
fn brokers() -> String {
    test_support::brokers()
}

/// A topic of someone else on the shared broker, with one message; returns
/// its name.
fn sentinel_topic() -> String {
    use outbox_kafka::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let topic = format!("bench_sentinel_{}", uuid::Uuid::now_v7().simple());
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let config = outbox_kafka::KafkaConfig {
        brokers: brokers(),
        topic_partitions: 1,
        ..outbox_kafka::KafkaConfig::default()
    };
    runtime
        .block_on(outbox_kafka::ensure_topics(&config, &[&topic]))
        .expect("the sentinel topic is created");
    let producer: BaseProducer = outbox_kafka::rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("a producer");
    producer
        .send(BaseRecord::<str, str>::to(&topic).payload("sentinel"))
        .map_err(|(e, _)| e)
        .expect("the sentinel message is queued");
    producer
        .flush(std::time::Duration::from_secs(10))
        .expect("the sentinel message is written");
    topic
}

/// Messages in `topic` (its high watermark), or `None` once it is gone.
fn messages_in(topic: &str) -> Option<i64> {
    use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = outbox_kafka::rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", "bench-sentinel")
        .create()
        .expect("a consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), std::time::Duration::from_secs(10))
        .ok()?;
    let known = metadata
        .topics()
        .first()
        .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
    if !known {
        return None;
    }
    consumer
        .fetch_watermarks(topic, 0, std::time::Duration::from_secs(10))
        .ok()
        .map(|(_, high)| high)
}

/// Invariants: the smoke run's report is complete (below), and the bench
/// leaves the other topics of the shared broker alone: tansu 0.6 deletes
/// every topic on any DeleteTopics request, so a bench that deleted its
/// own topics wiped the demo's `user_events` too (whose consumer then
/// stops on an offset regression).
#[test]
fn smoke_run_writes_a_complete_report() {
    let sentinel = sentinel_topic();
    assert_eq!(messages_in(&sentinel), Some(1), "the sentinel is written");
    let out = std::env::temp_dir().join(format!("outbox-bench-smoke-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--size", "smoke", "--out"])
        .arg(&out)
        .status()
        .expect("the bench binary starts");
    assert!(status.success(), "bench --size smoke failed: {status}");
    let after = messages_in(&sentinel);
    println!("another topic on the shared broker: 1 message before the bench, {after:?} after");
    assert_eq!(
        after,
        Some(1),
        "the bench deleted another topic of the broker"
    );

    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    let report: serde_json::Value = serde_json::from_str(&text).expect("report.json is JSON");
    for key in KEYS {
        let value = report[key].as_f64();
        // CPU is read in clock ticks (10 ms): a smoke-sized phase may spend
        // less than one of PostgreSQL's.
        let least_cpu = key.contains("_cpu_s_per_1k");
        assert!(
            value.is_some_and(|v| v.is_finite() && (v > 0.0 || (least_cpu && v == 0.0))),
            "{key} is {:?} in {text}",
            report[key]
        );
    }
    // Every target has its verdict (met or not: a smoke run asserts no figure).
    for key in [
        "relay_vs_naive",
        "relay_vs_limit",
        "sink_vs_limit",
        "e2e_p99_ms",
        "relay_rss_mb",
        "relay3_rss_mb",
        "consumer_rss_mb",
        "claim_vacuumed_vs_empty",
        "wal_relay_vs_raw_produce",
        "wal_pg_cpu_vs_outbox",
        "wal_e2e_p99_vs_floor",
    ] {
        let target = &report["targets"][key];
        assert!(target["met"].is_boolean(), "no verdict for {key} in {text}");
        assert!(target["target"].is_string(), "no bound for {key} in {text}");
    }
    assert_eq!(report["size"], "smoke");
    assert!(report["machine"]["cores"].as_u64().is_some_and(|c| c > 0));
    assert!(!report["machine"]["postgres"]
        .as_str()
        .unwrap_or("")
        .is_empty());

    let svg = std::fs::read_to_string(out.join("report.svg")).expect("report.svg written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("<polyline"), "the plot has no data line");
    let _ = std::fs::remove_dir_all(&out);
}
