//! The results: a table on stdout, `report.json` and `report.svg`.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::Env;

/// Everything one run measured.
pub struct Report {
    size: String,
    machine: Value,
    figures: Vec<(String, f64)>,
    timelines: Vec<(String, Vec<(f64, f64)>)>,
    latencies: Vec<(String, Vec<f64>)>,
}

impl Report {
    pub fn new(size: String, machine: Value) -> Self {
        Self {
            size,
            machine,
            figures: Vec::new(),
            timelines: Vec::new(),
            latencies: Vec::new(),
        }
    }

    pub fn figure(&mut self, key: &str, value: f64) {
        self.figures.push((key.to_string(), value));
    }

    pub fn get(&self, key: &str) -> f64 {
        self.figures
            .iter()
            .find(|(k, _)| k == key)
            .map_or(f64::NAN, |(_, v)| *v)
    }

    pub fn timeline(&mut self, label: &str, points: Vec<(f64, f64)>) {
        self.timelines.push((label.to_string(), points));
    }

    pub fn latencies(&mut self, label: String, sorted_ms: Vec<f64>) {
        self.latencies.push((label, sorted_ms));
    }

    /// The ratios the targets are stated in, against limits of this same run.
    pub fn derive_ratios(&mut self) {
        let relay_limit = self.get("raw_produce_eps").min(self.get("raw_claim_eps"));
        let sink_limit = self.get("raw_consume_eps").min(self.get("raw_insert_rps"));
        let ratios = [
            (
                "relay_vs_naive",
                self.get("relay_eps") / self.get("naive_relay_eps"),
            ),
            ("relay_vs_limit", self.get("relay_eps") / relay_limit),
            ("relay3_vs_limit", self.get("relay3_eps") / relay_limit),
            ("sink_vs_limit", self.get("sink_rps") / sink_limit),
            (
                "claim_after_vs_empty",
                self.get("claim_ms_after_backlog") / self.get("claim_ms_empty"),
            ),
            (
                "claim_vacuumed_vs_empty",
                self.get("claim_ms_after_vacuum") / self.get("claim_ms_empty"),
            ),
        ];
        for (key, value) in ratios {
            self.figure(key, value);
        }
    }

    pub fn print_table(&self) {
        let rows: [(&str, &str, &str); 33] = [
            ("raw_produce_eps", "raw: rdkafka producer → broker", "msg/s"),
            ("raw_consume_eps", "raw: rdkafka consumer ← broker", "msg/s"),
            (
                "raw_insert_rps",
                "raw: ClickHouse insert (50k rows)",
                "rows/s",
            ),
            ("raw_claim_eps", "raw: Postgres claim + delete", "rows/s"),
            (
                "naive_relay_eps",
                "original design (row at a time)",
                "events/s",
            ),
            ("relay_eps", "ours: 1 relay, backlog", "events/s"),
            ("relay3_eps", "ours: 3 relays, backlog", "events/s"),
            ("sink_rps", "ours: consumer, backlog", "rows/s"),
            ("e2e_p50_ms", "ours: e2e p50 @ 1k/s", "ms"),
            ("e2e_p99_ms", "ours: e2e p99 @ 1k/s", "ms"),
            ("e2e_max_ms", "ours: e2e max @ 1k/s", "ms"),
            (
                "e2e_kafka_p50_ms",
                "  of which commit → in Kafka, p50 @ 1k/s",
                "ms",
            ),
            (
                "e2e_kafka_p99_ms",
                "  of which commit → in Kafka, p99 @ 1k/s",
                "ms",
            ),
            (
                "raw_e2e_kafka_p50_ms",
                "  raw: send → in Kafka, p50 @ 1k/s",
                "ms",
            ),
            (
                "raw_e2e_kafka_p99_ms",
                "  raw: send → in Kafka, p99 @ 1k/s",
                "ms",
            ),
            (
                "raw_insert_small_p50_ms",
                "  raw: ClickHouse insert of 20 rows, p50",
                "ms",
            ),
            (
                "raw_insert_small_p99_ms",
                "  raw: ClickHouse insert of 20 rows, p99",
                "ms",
            ),
            ("e2e_5k_p50_ms", "ours: e2e p50 @ 5k/s", "ms"),
            ("e2e_5k_p99_ms", "ours: e2e p99 @ 5k/s", "ms"),
            ("e2e_5k_max_ms", "ours: e2e max @ 5k/s", "ms"),
            ("relay_rss_mb", "ours: relay peak RSS", "MiB"),
            (
                "relay3_rss_mb",
                "ours: largest of 3 relays, peak RSS",
                "MiB",
            ),
            ("consumer_rss_mb", "ours: consumer peak RSS", "MiB"),
            ("claim_ms_empty", "claim+ack of 1000, new table", "ms"),
            (
                "claim_ms_after_backlog",
                "claim+ack of 1000, after backlog",
                "ms",
            ),
            (
                "claim_ms_after_vacuum",
                "claim+ack of 1000, after backlog + vacuum",
                "ms",
            ),
            ("relay_vs_naive", "ratio: relay / original", "× (≥ 20)"),
            (
                "relay_vs_limit",
                "ratio: relay / min(produce, claim)",
                "(≥ 0.8)",
            ),
            (
                "relay3_vs_limit",
                "ratio: 3 relays / min(produce, claim)",
                "",
            ),
            (
                "sink_vs_limit",
                "ratio: consumer / min(consume, insert)",
                "(≥ 0.8)",
            ),
            (
                "claim_after_vs_empty",
                "ratio: claim right after backlog / new",
                "",
            ),
            (
                "claim_vacuumed_vs_empty",
                "ratio: claim after backlog + vacuum / new",
                "(≈ 1)",
            ),
            ("e2e_events", "events timed @ 1k/s", ""),
        ];
        println!();
        println!(
            "benchmark ({} size) on {}",
            self.size,
            self.machine["summary"].as_str().unwrap_or("?")
        );
        println!("{:<42} {:>14}  unit (target)", "measure", "value");
        println!("{}", "-".repeat(76));
        for (key, label, unit) in rows {
            let value = self.get(key);
            let shown = if value.is_nan() {
                "-".to_string()
            } else if value.abs() >= 100.0 {
                format!("{value:.0}")
            } else {
                format!("{value:.2}")
            };
            println!("{label:<42} {shown:>14}  {unit}");
        }
        println!();
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let mut map = Map::new();
        for (key, value) in &self.figures {
            // JSON has no NaN: a figure that could not be computed is null.
            map.insert(
                key.clone(),
                serde_json::Number::from_f64(*value).map_or(Value::Null, Value::Number),
            );
        }
        map.insert("size".into(), json!(self.size));
        map.insert("machine".into(), self.machine.clone());
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(map))?)?;
        Ok(())
    }

    pub fn write_svg(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.svg())?;
        Ok(())
    }

    fn svg(&self) -> String {
        const W: f64 = 1100.0;
        const H: f64 = 460.0;
        let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
        let mut out = String::new();
        let _ = write!(
            out,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"##
        );
        let _ = write!(
            out,
            r#"<text x="20" y="22" font-size="14">outbox benchmark ({} size): {}</text>"#,
            self.size,
            escape(self.machine["summary"].as_str().unwrap_or("?"))
        );

        // Left: latency distribution (CDF), up to the largest p99.9.
        let x_max = self
            .latencies
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(_, v)| v[((v.len() - 1) as f64 * 0.999) as usize])
            .fold(1.0f64, f64::max)
            * 1.1;
        let left = Panel {
            x: 70.0,
            y: 50.0,
            w: 430.0,
            h: 340.0,
            x_max,
            y_max: 1.0,
        };
        left.axes(
            &mut out,
            "commit → row in ClickHouse (ms)",
            "share of events (CDF)",
        );
        for (i, (label, sorted)) in self.latencies.iter().enumerate() {
            if sorted.is_empty() {
                continue;
            }
            let step = (sorted.len() / 400).max(1);
            let points: Vec<(f64, f64)> = sorted
                .iter()
                .enumerate()
                .step_by(step)
                .map(|(k, v)| (v.min(x_max), (k + 1) as f64 / sorted.len() as f64))
                .collect();
            left.line(&mut out, &points, colors[i % colors.len()]);
            left.legend(&mut out, i, label, colors[i % colors.len()]);
        }

        // Right: throughput over time of the backlog runs.
        let t_max = self
            .timelines
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(t, _)| *t))
            .fold(1.0f64, f64::max);
        let r_max = self
            .timelines
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, r)| *r))
            .fold(1.0f64, f64::max)
            * 1.1;
        let right = Panel {
            x: 620.0,
            y: 50.0,
            w: 440.0,
            h: 340.0,
            x_max: t_max,
            y_max: r_max,
        };
        right.axes(&mut out, "seconds since start", "events per second");
        for (i, (label, points)) in self.timelines.iter().enumerate() {
            right.line(&mut out, points, colors[i % colors.len()]);
            right.legend(&mut out, i, label, colors[i % colors.len()]);
        }
        out.push_str("</svg>\n");
        out
    }
}

struct Panel {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    x_max: f64,
    y_max: f64,
}

impl Panel {
    fn px(&self, x: f64) -> f64 {
        self.x + self.w * (x / self.x_max).clamp(0.0, 1.0)
    }

    fn py(&self, y: f64) -> f64 {
        self.y + self.h * (1.0 - (y / self.y_max).clamp(0.0, 1.0))
    }

    fn axes(&self, out: &mut String, x_label: &str, y_label: &str) {
        let (x0, y0, x1, y1) = (self.x, self.y + self.h, self.x + self.w, self.y);
        let _ = write!(
            out,
            r#"<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0}" stroke="black" fill="none"/>"#
        );
        for k in 0..=5 {
            let fx = self.x_max * f64::from(k) / 5.0;
            let fy = self.y_max * f64::from(k) / 5.0;
            let (tx, ty) = (self.px(fx), self.py(fy));
            let _ = write!(
                out,
                r##"<line x1="{tx}" y1="{y0}" x2="{tx}" y2="{y1}" stroke="#eee"/><text x="{tx}" y="{}" text-anchor="middle">{}</text>"##,
                y0 + 16.0,
                tick(fx)
            );
            let _ = write!(
                out,
                r##"<line x1="{x0}" y1="{ty}" x2="{x1}" y2="{ty}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                x0 - 6.0,
                ty + 4.0,
                tick(fy)
            );
        }
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            self.x + self.w / 2.0,
            y0 + 36.0,
            escape(x_label)
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" transform="rotate(-90 {} {})">{}</text>"#,
            self.x - 52.0,
            self.y + self.h / 2.0,
            self.x - 52.0,
            self.y + self.h / 2.0,
            escape(y_label)
        );
    }

    fn line(&self, out: &mut String, points: &[(f64, f64)], color: &str) {
        if points.is_empty() {
            return;
        }
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", self.px(*x), self.py(*y)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline points="{}" stroke="{color}" stroke-width="1.5" fill="none"/>"#,
            path.join(" ")
        );
    }

    fn legend(&self, out: &mut String, index: usize, label: &str, color: &str) {
        let y = self.y + 14.0 + 16.0 * index as f64;
        let x = self.x + self.w - 230.0;
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="4" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            y - 4.0,
            x + 18.0,
            y + 1.0,
            escape(label)
        );
    }
}

fn tick(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Cores, memory, CPU and the versions of every service and library.
pub async fn describe_machine(env: &Env) -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or_else(String::new, |m| m.trim().to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let postgres = match env.pool.get().await {
        Ok(client) => client
            .query_one("SHOW server_version", &[])
            .await
            .map(|row| row.get::<_, String>(0))
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let clickhouse = match sink_clickhouse::client_for(&env.ch) {
        Ok(client) => client
            .query("SELECT version()")
            .fetch_one::<String>()
            .await
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let (_, librdkafka) = outbox_kafka::rdkafka::util::get_rdkafka_version();
    let broker = find_broker();
    let summary = format!(
        "{cores} cores, {mem_gib:.0} GiB, PostgreSQL {postgres}, {broker}, ClickHouse {clickhouse}, librdkafka {librdkafka}"
    );
    json!({
        "summary": summary,
        "cores": cores,
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
        "cpu": cpu,
        "kernel": kernel,
        "postgres": postgres,
        "clickhouse": clickhouse,
        "kafka_broker": broker,
        "librdkafka": librdkafka,
    })
}

/// The broker process on this machine, if it is the stack's tansu.
fn find_broker() -> String {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return "Kafka broker".into();
    };
    for entry in entries.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if let Some(path) = text.split_whitespace().next() {
            if path.ends_with("/tansu") && text.contains(" broker") {
                let version = path
                    .split('/')
                    .find_map(|part| part.strip_prefix("tansu-"))
                    .unwrap_or("?");
                return format!("tansu {version} (sqlite)");
            }
        }
    }
    "Kafka broker".into()
}
