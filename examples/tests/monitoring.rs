//! The monitoring files of `deploy/` against the real binaries and a real
//! Prometheus server (Debian's `prometheus` package, which
//! `scripts/stack.sh up` installs): the metrics pass `promtool check
//! metrics` and match the catalog, every metric the alert rules and the
//! dashboard name is exported, and an alert fires when its condition is made
//! true.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use outbox_core::metrics_catalog;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

fn spawn(cmd: &mut Command) -> KillOnDrop {
    KillOnDrop(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Series of a Prometheus text exposition: name → the label sets seen.
fn series(text: &str) -> BTreeMap<String, BTreeSet<Vec<String>>> {
    let mut out: BTreeMap<String, BTreeSet<Vec<String>>> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..end];
        let mut labels: Vec<String> = match line[end..].strip_prefix('{') {
            Some(rest) => rest[..rest.find('}').unwrap()]
                .split(',')
                .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.trim().to_string()))
                .filter(|label| label != "le")
                .collect(),
            None => Vec::new(),
        };
        labels.sort();
        out.entry(name.to_string()).or_default().insert(labels);
    }
    out
}

/// The `outbox_` metric names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("outbox_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Every `expr:` of the alert rules.
fn rule_exprs(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("expr:"))
        .map(|expr| expr.trim().to_string())
        .collect()
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    exprs
}

/// The rules with every range and `for` duration shrunk to seconds, so the
/// test sees in seconds what takes minutes in production.
fn shrunk(rules: &str) -> String {
    let mut out = String::new();
    for line in rules.lines() {
        let mut line = line.to_string();
        if line.trim_start().starts_with("for:") {
            let indent = &line[..line.find("for:").unwrap()];
            line = format!("{indent}for: 0s");
        }
        while let Some(open) = line.find('[').filter(|&at| {
            line[at..]
                .find(']')
                .is_some_and(|close| line[at + 1..at + close].ends_with(['m', 'h']))
        }) {
            let close = open + line[open..].find(']').unwrap();
            line.replace_range(open..=close, "{10s}");
        }
        out.push_str(&line.replace("{10s}", "[10s]"));
        out.push('\n');
    }
    out
}

fn promtool_check_metrics(what: &str, text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package: scripts/stack.sh up installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!(
        "promtool check metrics ({what}): {} lines, {}",
        text.lines().count(),
        if said.trim().is_empty() {
            "clean"
        } else {
            said.trim()
        }
    );
    assert!(output.status.success() && said.trim().is_empty(), "{said}");
}

async fn prometheus_get(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}{path}")).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The label sets (without `__name__`) of a PromQL query's results.
async fn query(port: u16, promql: &str) -> Vec<BTreeMap<String, String>> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let answer = prometheus_get(port, &format!("/api/v1/query?query={encoded}")).await;
    answer["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|result| {
            result["metric"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k != "__name__")
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .collect()
}

/// Alerts firing now: (name, job label).
async fn firing(port: u16) -> BTreeSet<(String, String)> {
    let answer = prometheus_get(port, "/api/v1/alerts").await;
    answer["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|alert| alert["state"] == "firing")
        .map(|alert| {
            let labels = &alert["labels"];
            (
                labels["alertname"].as_str().unwrap_or("").to_string(),
                labels["job"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Invariants: (metrics) both binaries' `/metrics` pass `promtool check
/// metrics`, every series is in `outbox_core::metrics_catalog` with exactly
/// its documented labels, and every metric that `deploy/prometheus/rules.yml`
/// and `deploy/grafana/outbox-pipeline.json` name is exported by a running
/// relay (flag table and WAL sources) or consumer; (Prometheus) a real
/// server scraping them holds the series with their labels, fires no
/// OutboxConsumerStalled while events flow, and fires it (and
/// OutboxTargetDown for the consumer) once the consumer is killed while
/// events keep flowing.
#[tokio::test]
async fn the_monitoring_files_match_the_binaries_and_an_alert_fires() {
    let name = unique("mon");
    let slot = unique("wal");
    let pool = pg().create_pool().unwrap();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {name} (id bigserial PRIMARY KEY, username text NOT NULL,
               event_type text NOT NULL, event_time timestamptz NOT NULL DEFAULT now(),
               sent_to_kafka boolean NOT NULL DEFAULT false);
             CREATE INDEX ON {name} (id) WHERE NOT sent_to_kafka;"
        ))
        .await
        .unwrap();

    let (relay_port, consumer_port, wal_port) = (free_port(), free_port(), free_port());
    let metrics_addr = |port: u16| format!("127.0.0.1:{port}");
    let _relay = spawn(
        command("producer_pg_to_kafka")
            .args(["--table", &name, "--topic", &name])
            .args(["--backlog-interval-secs", "1"])
            .env("OUTBOX_METRICS_ADDR", metrics_addr(relay_port)),
    );
    let mut consumer = spawn(
        command("consumer_to_clickhouse")
            .args(["--topic", &name, "--clickhouse-table", &name])
            .args(["--group-id", &unique("g"), "--lag-interval-secs", "1"])
            .env("OUTBOX_METRICS_ADDR", metrics_addr(consumer_port)),
    );
    // A WAL relay of emitted messages only: it publishes nothing here, but
    // exports the slot's gauges.
    let _wal_relay = spawn(
        command("producer_pg_to_kafka")
            .args(["--source", "wal", "--wal-messages-only"])
            .args(["--wal-slot", &slot, "--wal-publication", &slot])
            .env("OUTBOX_METRICS_ADDR", metrics_addr(wal_port)),
    );

    // Events keep flowing: a login every 100 ms.
    let inserted = Arc::new(AtomicU64::new(0));
    let writer = {
        let (pool, name, inserted) = (pool.clone(), name.clone(), inserted.clone());
        tokio::spawn(async move {
            let client = pool.get().await.unwrap();
            loop {
                client
                    .execute(
                        &format!("INSERT INTO {name} (username, event_type) VALUES ('u' || (random() * 5)::int, 'login')"),
                        &[],
                    )
                    .await
                    .unwrap();
                inserted.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    within(
        Duration::from_secs(60),
        "the first rows in ClickHouse",
        async {
            while ch_query(&format!("EXISTS TABLE `{name}` FORMAT TabSeparated")).await != "1"
                || ch_count(&name).await < 20
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await;

    // Every metric the rules and the dashboard name, once each binary has
    // exported what it exports (the WAL gauges come with the slot's first
    // report, the lag gauge with the first lag round).
    let rules = std::fs::read_to_string(format!("{DEPLOY}/prometheus/rules.yml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{DEPLOY}/grafana/outbox-pipeline.json")).unwrap(),
    )
    .unwrap();
    let mut named = BTreeSet::new();
    for expr in rule_exprs(&rules)
        .iter()
        .chain(&dashboard_exprs(&dashboard))
    {
        named.extend(metric_names(expr));
    }
    let exported_base = |texts: &[&String]| -> BTreeSet<String> {
        texts
            .iter()
            .flat_map(|text| series(text).into_keys())
            .filter_map(|series| metrics_catalog::find(&series).map(|m| m.name.to_string()))
            .collect()
    };
    let mut scraped = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        scraped.clear();
        for port in [relay_port, consumer_port, wal_port] {
            scraped.push(
                http_get(&format!("http://127.0.0.1:{port}/metrics"))
                    .await
                    .1,
            );
        }
        let exported = exported_base(&scraped.iter().collect::<Vec<_>>());
        let named_bases: BTreeSet<String> = named
            .iter()
            .map(|n| metrics_catalog::find(n).map_or(n.clone(), |m| m.name.to_string()))
            .collect();
        let missing: Vec<_> = named_bases.difference(&exported).cloned().collect();
        if missing.is_empty() {
            println!(
                "the rules and the dashboard name {} metrics, all exported",
                named_bases.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "named by the rules or the dashboard but not exported: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (what, text) in ["relay", "consumer", "wal relay"].iter().zip(&scraped) {
        promtool_check_metrics(what, text);
        for (series, label_sets) in series(text) {
            let metric = metrics_catalog::find(&series)
                .unwrap_or_else(|| panic!("{what} exports {series}, which the catalog lacks"));
            let mut documented: Vec<String> = metric.labels.iter().map(|l| l.to_string()).collect();
            documented.sort();
            for labels in label_sets {
                assert_eq!(labels, documented, "{what}: labels of {series}");
            }
        }
    }

    // A real Prometheus, scraping every second, with the rules shrunk.
    let dir = std::env::temp_dir().join(unique("prometheus"));
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir, "rules.yml", &shrunk(&rules));
    let config = write(
        &dir,
        "prometheus.yml",
        &format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [rules.yml]\n\
             scrape_configs:\n\
             - job_name: outbox-relay\n  static_configs: [{{targets: ['127.0.0.1:{relay_port}', '127.0.0.1:{wal_port}']}}]\n\
             - job_name: outbox-consumer\n  static_configs: [{{targets: ['127.0.0.1:{consumer_port}']}}]\n"
        ),
    );
    let prometheus_port = free_port();
    let _prometheus = spawn(Command::new("prometheus").args([
        &format!("--config.file={}", config.display()),
        &format!("--storage.tsdb.path={}", dir.join("data").display()),
        &format!("--web.listen-address=127.0.0.1:{prometheus_port}"),
    ]));
    within(Duration::from_secs(30), "Prometheus ready", async {
        while http_get(&format!("http://127.0.0.1:{prometheus_port}/-/ready"))
            .await
            .0
            != 200
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;

    let labelled = [
        ("outbox_stage_up", vec!["instance", "job", "stage"]),
        (
            "outbox_errors_total",
            vec!["class", "instance", "job", "loop", "stage"],
        ),
        (
            "outbox_consumer_lag",
            vec!["instance", "job", "partition", "topic"],
        ),
        ("outbox_wal_retained_bytes", vec!["instance", "job", "slot"]),
        (
            "outbox_sink_inserts_total",
            vec!["instance", "job", "table"],
        ),
    ];
    within(Duration::from_secs(30), "the series in Prometheus", async {
        'wait: loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for (metric, labels) in &labelled {
                let results = query(prometheus_port, metric).await;
                if results.is_empty() {
                    continue 'wait;
                }
                for result in &results {
                    let names: Vec<&str> = result.keys().map(String::as_str).collect();
                    assert_eq!(&names, labels, "labels of {metric} in Prometheus");
                }
            }
            let up = query(prometheus_port, "outbox_stage_up == 1").await;
            let jobs: BTreeSet<&str> = up.iter().map(|r| r["job"].as_str()).collect();
            if jobs.len() == 2 {
                println!("Prometheus holds the series; stages up: {}", up.len());
                break;
            }
        }
    })
    .await;

    // Events flow and the consumer writes: no alarm, once Prometheus has two
    // scrapes of the consumer's counter (a rate needs them; before, the
    // rule sees the relay publish and no consumer yet).
    within(
        Duration::from_secs(30),
        "a consumer rate in Prometheus",
        async {
            while query(
                prometheus_port,
                "sum(rate(outbox_consumer_records_total[10s])) > 0",
            )
            .await
            .is_empty()
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        },
    )
    .await;
    // Past the one rule evaluation (1 s) that may have seen no rate yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..5 {
        let now = firing(prometheus_port).await;
        assert!(
            !now.iter()
                .any(|(alert, _)| alert == "OutboxConsumerStalled"),
            "false alarm while the consumer writes: {now:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The consumer dies; events keep flowing.
    let written_before = ch_count(&name).await;
    let _ = consumer.0.kill();
    let _ = consumer.0.wait();
    let killed = Instant::now();
    let expected = [
        ("OutboxConsumerStalled".to_string(), String::new()),
        (
            "OutboxTargetDown".to_string(),
            "outbox-consumer".to_string(),
        ),
    ];
    let now = within(Duration::from_secs(60), "the alerts", async {
        loop {
            let now = firing(prometheus_port).await;
            if expected.iter().all(|alert| now.contains(alert)) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    writer.abort();
    println!(
        "inserted {} rows, {written_before} in ClickHouse when the consumer was killed; \
         {:.1} s later firing: {now:?}",
        inserted.load(Ordering::Relaxed),
        killed.elapsed().as_secs_f64()
    );
    assert!(
        !now.iter()
            .any(|(alert, job)| alert == "OutboxTargetDown" && job == "outbox-relay"),
        "the relays still answer: {now:?}"
    );

    drop(_prometheus);
    let _ = std::fs::remove_dir_all(&dir);
    drop(_wal_relay);
    // A slot left behind would pin WAL and, on PostgreSQL 15, stop every
    // index of the server from reusing its deleted pages.
    test_support::drop_slot(&client, &slot).await.unwrap();
    let _ = client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {slot};
             DELETE FROM outbox_wal_progress WHERE slot = '{slot}';
             DROP TABLE {name};"
        ))
        .await;
}

#[test]
fn shrinking_keeps_the_rules_valid() {
    let text = "        expr: rate(x[5m]) > 0 unless y[15m]\n        for: 10m\n";
    assert_eq!(
        shrunk(text),
        "        expr: rate(x[10s]) > 0 unless y[10s]\n        for: 0s\n"
    );
    assert_eq!(
        metric_names("sum(rate(outbox_a_total[1m])) / outbox_b"),
        BTreeSet::from(["outbox_a_total".to_string(), "outbox_b".to_string()])
    );
}
