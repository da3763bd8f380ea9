//! The benchmark's smoke run (`--size smoke`) against the local stack: every
//! phase runs and the report is complete and valid. No figure is asserted:
//! speed is for `make bench` to show, not for tests to time.

use std::process::Command;

/// Every number the report must hold (issue #5's keys, plus the claim-cost
/// and 5k-events/s latency figures).
const KEYS: [&str; 29] = [
    "raw_produce_eps",
    "raw_consume_eps",
    "raw_insert_rps",
    "raw_claim_eps",
    "naive_relay_eps",
    "relay_eps",
    "relay3_eps",
    "sink_rps",
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
];

#[test]
fn smoke_run_writes_a_complete_report() {
    let out = std::env::temp_dir().join(format!("outbox-bench-smoke-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--size", "smoke", "--out"])
        .arg(&out)
        .status()
        .expect("the bench binary starts");
    assert!(status.success(), "bench --size smoke failed: {status}");

    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    let report: serde_json::Value = serde_json::from_str(&text).expect("report.json is JSON");
    for key in KEYS {
        let value = report[key].as_f64();
        assert!(
            value.is_some_and(|v| v.is_finite() && v > 0.0),
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
