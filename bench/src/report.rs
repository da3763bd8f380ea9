//! The results: a table on stdout, `report.json` and `report.svg`.

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

    /// Records the quantiles `qs` of the sorted `values` as
    /// `{stem}_p50_ms`, `{stem}_p99_ms`, … (1.0 as `{stem}_max_ms`).
    pub fn percentiles(&mut self, stem: &str, values: &[f64], qs: &[f64]) {
        for &q in qs {
            let name = if q >= 1.0 {
                "max".to_string()
            } else {
                format!("p{}", (q * 100.0).round())
            };
            self.figure(
                &format!("{stem}_{name}_ms"),
                crate::latency::quantile(values, q),
            );
        }
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
            (
                "relay3_vs_relay",
                self.get("relay3_eps") / self.get("relay_eps"),
            ),
            (
                "wal_relay_vs_raw_produce",
                self.get("wal_relay_eps") / self.get("raw_produce_eps"),
            ),
            // PostgreSQL's whole cost of an event at a steady 1,000 events/s
            // (the service's writes, the relay's reads, vacuum): the outbox
            // table's insert, claim and delete against the WAL's message
            // and decoding.
            (
                "wal_pg_cpu_vs_outbox",
                self.get("wal_e2e_cpu_s_per_1k_postgres") / self.get("e2e_cpu_s_per_1k_postgres"),
            ),
            // Draining a backlog only (the writes done before): the outbox
            // relay's claims and deletes against the WAL sender's decoding.
            (
                "wal_pg_drain_cpu_vs_outbox",
                self.get("wal_relay_pg_cpu_s_per_1k") / self.get("relay_pg_cpu_s_per_1k"),
            ),
            // The table-driven encoder against the typed mapper, same rows.
            (
                "table_rows_vs_typed",
                self.get("table_rows_rps") / self.get("typed_mapper_rps"),
            ),
            (
                "table_rows_cpu_vs_typed",
                self.get("table_rows_cpu_s_per_1k") / self.get("typed_mapper_cpu_s_per_1k"),
            ),
            (
                "relay_cpu_vs_raw",
                self.get("relay_cpu_s_per_1k") / self.get("raw_produce_cpu_s_per_1k"),
            ),
            (
                "consumer_cpu_vs_raw",
                self.get("consumer_cpu_s_per_1k")
                    / (self.get("raw_consume_cpu_s_per_1k") + self.get("raw_insert_cpu_s_per_1k")),
            ),
        ];
        // Latency against the floors of the same rate in the same run: the
        // broker hop alone, plus (to ClickHouse) a lone small insert.
        let insert = self.get("raw_insert_small_p99_ms");
        let mut latency_ratios = Vec::new();
        for prefix in ["e2e", "e2e_5k"] {
            let hop = self.get(&format!("raw_{prefix}_kafka_p99_ms"));
            latency_ratios.push((
                format!("{prefix}_kafka_p99_vs_raw"),
                self.get(&format!("{prefix}_kafka_p99_ms")) / hop,
            ));
            // The same, against the hop as loaded as the run made the
            // machine: the relay's own share of the distance.
            latency_ratios.push((
                format!("{prefix}_kafka_p99_vs_loaded_hop"),
                self.get(&format!("{prefix}_kafka_p99_ms"))
                    / self.get(&format!("{prefix}_hop_loaded_p99_ms")),
            ));
            latency_ratios.push((
                format!("{prefix}_p99_vs_floor"),
                self.get(&format!("{prefix}_p99_ms")) / (hop + insert),
            ));
        }
        // The flag-table source against the same floors.
        for prefix in ["e2e", "e2e_5k"] {
            let flag = self.get(&format!("{prefix}_flag_kafka_p99_ms"));
            latency_ratios.push((
                format!("{prefix}_flag_kafka_p99_vs_raw"),
                flag / self.get(&format!("raw_{prefix}_kafka_p99_ms")),
            ));
            latency_ratios.push((
                format!("{prefix}_flag_kafka_p99_vs_loaded_hop"),
                flag / self.get(&format!("{prefix}_flag_hop_loaded_p99_ms")),
            ));
        }
        // The sink's latency-oriented cadence (no floor between inserts)
        // against the same floors, and against the hop under that run's
        // load plus a lone insert.
        for prefix in ["e2e", "e2e_5k"] {
            let floor0 = self.get(&format!("{prefix}_floor0_p99_ms"));
            latency_ratios.push((
                format!("{prefix}_floor0_p99_vs_floor"),
                floor0 / (self.get(&format!("raw_{prefix}_kafka_p99_ms")) + insert),
            ));
            latency_ratios.push((
                format!("{prefix}_floor0_p99_vs_loaded_floor"),
                floor0 / (self.get(&format!("{prefix}_floor0_hop_loaded_p99_ms")) + insert),
            ));
            // And against both hops as loaded as the run made the machine:
            // what is left is our own code's share.
            latency_ratios.push((
                format!("{prefix}_floor0_p99_vs_loaded_hops"),
                floor0
                    / (self.get(&format!("{prefix}_floor0_hop_loaded_p99_ms"))
                        + self.get(&format!("{prefix}_floor0_insert_loaded_p99_ms"))),
            ));
        }
        latency_ratios.push((
            "wal_e2e_p99_vs_floor".to_string(),
            self.get("wal_e2e_p99_ms") / (self.get("raw_e2e_kafka_p99_ms") + insert),
        ));
        latency_ratios.push((
            "wal_e2e_kafka_p99_vs_raw".to_string(),
            self.get("wal_e2e_kafka_p99_ms") / self.get("raw_e2e_kafka_p99_ms"),
        ));
        for (key, value) in latency_ratios {
            self.figure(&key, value);
        }
        for (key, value) in ratios {
            self.figure(key, value);
        }
    }

    pub fn print_table(&self) {
        let rows: &[(&str, &str, &str)] = &[
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
            (
                "wal_relay_eps",
                "ours: 1 relay, WAL source, backlog",
                "events/s",
            ),
            ("sink_rps", "ours: consumer, backlog", "rows/s"),
            (
                "typed_mapper_rps",
                "ours: sink, typed mapper (user_logins)",
                "rows/s",
            ),
            (
                "table_rows_rps",
                "ours: sink, rows driven by the table",
                "rows/s",
            ),
            (
                "relay_startup_s",
                "  start-up: relay start → first event in Kafka",
                "s",
            ),
            (
                "sink_startup_s",
                "  start-up: consumer start → first row in ClickHouse",
                "s",
            ),
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
            (
                "e2e_inserts_per_min",
                "  inserts (parts) per minute @ 1k/s, default floor",
                "/min",
            ),
            (
                "e2e_floor0_p99_ms",
                "ours: e2e p99 @ 1k/s, no insert floor",
                "ms",
            ),
            (
                "e2e_floor0_inserts_per_min",
                "  inserts (parts) per minute @ 1k/s, no floor",
                "/min",
            ),
            (
                "e2e_floor0_p99_vs_floor",
                "  e2e p99 / (hop + insert) @ 1k/s, no floor",
                "",
            ),
            (
                "e2e_floor0_p99_vs_loaded_floor",
                "  e2e p99 / (hop under load + insert) @ 1k/s, no floor",
                "",
            ),
            (
                "e2e_floor0_insert_loaded_p99_ms",
                "  a lone insert under that load, p99 @ 1k/s",
                "ms",
            ),
            (
                "e2e_floor0_p99_vs_loaded_hops",
                "  e2e p99 / (hop + insert, both under load) @ 1k/s, no floor",
                "",
            ),
            ("e2e_5k_p50_ms", "ours: e2e p50 @ 5k/s", "ms"),
            ("e2e_5k_p99_ms", "ours: e2e p99 @ 5k/s", "ms"),
            ("e2e_5k_max_ms", "ours: e2e max @ 5k/s", "ms"),
            (
                "e2e_5k_floor0_p99_ms",
                "ours: e2e p99 @ 5k/s, no insert floor",
                "ms",
            ),
            (
                "e2e_5k_floor0_inserts_per_min",
                "  inserts (parts) per minute @ 5k/s, no floor",
                "/min",
            ),
            (
                "e2e_5k_floor0_p99_vs_floor",
                "  e2e p99 / (hop + insert) @ 5k/s, no floor",
                "",
            ),
            (
                "e2e_5k_floor0_p99_vs_loaded_floor",
                "  e2e p99 / (hop under load + insert) @ 5k/s, no floor",
                "",
            ),
            (
                "e2e_5k_floor0_insert_loaded_p99_ms",
                "  a lone insert under that load, p99 @ 5k/s",
                "ms",
            ),
            (
                "e2e_5k_floor0_p99_vs_loaded_hops",
                "  e2e p99 / (hop + insert, both under load) @ 5k/s, no floor",
                "",
            ),
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
            ("relay_vs_limit", "ratio: relay / min(produce, claim)", ""),
            (
                "relay3_vs_limit",
                "ratio: 3 relays / min(produce, claim)",
                "",
            ),
            (
                "sink_vs_limit",
                "ratio: consumer / min(consume, insert)",
                "",
            ),
            (
                "claim_after_vs_empty",
                "ratio: claim right after backlog / new",
                "",
            ),
            (
                "claim_vacuumed_vs_empty",
                "ratio: claim after backlog + vacuum / new",
                "(≤ 1.5)",
            ),
            ("relay3_vs_relay", "ratio: 3 relays / 1 relay", "(≥ 1.0)"),
            (
                "wal_relay_vs_raw_produce",
                "ratio: WAL relay / raw produce",
                "(≥ 0.8)",
            ),
            (
                "table_rows_vs_typed",
                "ratio: table-driven rows / typed mapper",
                "(≥ 0.8)",
            ),
            (
                "table_rows_cpu_vs_typed",
                "ratio: CPU per row, table-driven / typed",
                "",
            ),
            (
                "wal_pg_cpu_vs_outbox",
                "ratio: PostgreSQL CPU @ 1k/s, WAL / outbox source",
                "(≤ 0.5)",
            ),
            (
                "wal_pg_drain_cpu_vs_outbox",
                "ratio: PostgreSQL CPU draining, WAL / outbox",
                "",
            ),
            (
                "wal_e2e_p99_vs_floor",
                "ratio: WAL e2e p99 / (hop + insert) p99 @ 1k/s",
                "(≤ 1.5)",
            ),
            (
                "wal_e2e_kafka_p99_vs_raw",
                "ratio: WAL to Kafka p99 / raw hop p99 @ 1k/s",
                "(≤ 1.5)",
            ),
            (
                "e2e_kafka_p99_vs_raw",
                "ratio: to Kafka p99 / raw hop p99 @ 1k/s",
                "(≤ 1.5)",
            ),
            (
                "e2e_5k_kafka_p99_vs_raw",
                "ratio: to Kafka p99 / raw hop p99 @ 5k/s",
                "(≤ 1.5)",
            ),
            (
                "e2e_kafka_p99_vs_loaded_hop",
                "ratio: to Kafka p99 / hop under the same load p99 @ 1k/s",
                "",
            ),
            (
                "e2e_5k_kafka_p99_vs_loaded_hop",
                "ratio: to Kafka p99 / hop under the same load p99 @ 5k/s",
                "",
            ),
            (
                "e2e_flag_kafka_p99_ms",
                "flag table: to Kafka p99 @ 1k/s",
                "ms",
            ),
            (
                "e2e_flag_kafka_p99_vs_raw",
                "ratio: flag table to Kafka p99 / raw hop p99 @ 1k/s",
                "(≤ 1.5)",
            ),
            (
                "e2e_flag_kafka_p99_vs_loaded_hop",
                "ratio: flag table to Kafka p99 / hop under load @ 1k/s",
                "",
            ),
            (
                "e2e_5k_flag_kafka_p99_ms",
                "flag table: to Kafka p99 @ 5k/s",
                "ms",
            ),
            (
                "e2e_5k_flag_kafka_p99_vs_raw",
                "ratio: flag table to Kafka p99 / raw hop p99 @ 5k/s",
                "(≤ 1.5)",
            ),
            (
                "e2e_5k_flag_kafka_p99_vs_loaded_hop",
                "ratio: flag table to Kafka p99 / hop under load @ 5k/s",
                "",
            ),
            ("e2e_flag_p99_ms", "flag table: e2e p99 @ 1k/s", "ms"),
            ("e2e_5k_flag_p99_ms", "flag table: e2e p99 @ 5k/s", "ms"),
            (
                "e2e_p99_vs_floor",
                "ratio: e2e p99 / (hop + insert) @ 1k/s",
                "(≤ 1.5)",
            ),
            (
                "e2e_5k_p99_vs_floor",
                "ratio: e2e p99 / (hop + insert) @ 5k/s",
                "(≤ 1.5)",
            ),
            ("e2e_cpu_busy_pct", "CPU busy during the run @ 1k/s", "%"),
            ("e2e_5k_cpu_busy_pct", "CPU busy during the run @ 5k/s", "%"),
            ("e2e_events", "events timed @ 1k/s", ""),
            (
                "raw_produce_cpu_s_per_1k",
                "CPU: raw producer, backlog",
                "s/1k ev",
            ),
            (
                "raw_consume_cpu_s_per_1k",
                "CPU: raw consumer, backlog",
                "s/1k ev",
            ),
            (
                "raw_insert_cpu_s_per_1k",
                "CPU: raw insert client, backlog",
                "s/1k ev",
            ),
            ("relay_cpu_s_per_1k", "CPU: relay, backlog", "s/1k ev"),
            ("relay3_cpu_s_per_1k", "CPU: 3 relays, backlog", "s/1k ev"),
            (
                "wal_relay_cpu_s_per_1k",
                "CPU: relay, WAL source, backlog",
                "s/1k ev",
            ),
            (
                "relay_pg_cpu_s_per_1k",
                "CPU: PostgreSQL, outbox relay draining",
                "s/1k ev",
            ),
            (
                "wal_relay_pg_cpu_s_per_1k",
                "CPU: PostgreSQL, WAL relay draining",
                "s/1k ev",
            ),
            ("consumer_cpu_s_per_1k", "CPU: consumer, backlog", "s/1k ev"),
            (
                "relay_cpu_vs_raw",
                "ratio: relay CPU / raw producer's",
                "(≤ 1.5)",
            ),
            (
                "consumer_cpu_vs_raw",
                "ratio: consumer CPU / raw consume + insert",
                "(≤ 1.5)",
            ),
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
            let unit = unit_column(key, unit);
            println!("{label:<42} {:>14}  {unit}", shown(self.get(key)));
        }
        for (key, label, unit) in per_rate_rows() {
            println!("{label:<42} {:>14}  {unit}", shown(self.get(&key)));
        }
        println!();
    }

    /// Each target of the benchmark held against this run's figure, with,
    /// for the end-to-end latency, the floor that the same run measured.
    pub fn verdicts(&self) -> Vec<Verdict> {
        TARGETS
            .iter()
            .map(|target| {
                let value = self.get(target.key);
                let met = match target.bound {
                    Bound::AtLeast(bound) => value >= bound,
                    Bound::AtMost(bound) => value <= bound,
                };
                let note = match target.key {
                    _ if met => None,
                    "e2e_p99_ms" => self.latency_floor_note(),
                    "e2e_kafka_p99_vs_raw" => self.loaded_hop_note("e2e"),
                    "e2e_5k_kafka_p99_vs_raw" => self.loaded_hop_note("e2e_5k"),
                    "e2e_p99_vs_floor" => self.cadence_note("e2e"),
                    "e2e_5k_p99_vs_floor" => self.cadence_note("e2e_5k"),
                    _ => None,
                };
                Verdict {
                    key: target.key,
                    label: target.label,
                    value,
                    bound: target.bound,
                    met,
                    note,
                }
            })
            .collect()
    }

    /// A missed to-Kafka target read against the broker hop as loaded as
    /// the run made the machine (the probe beside the run): whether the
    /// distance is the relay's or the loaded broker's.
    fn loaded_hop_note(&self, prefix: &str) -> Option<String> {
        let loaded = self.get(&format!("{prefix}_hop_loaded_p99_ms"));
        let ratio = self.get(&format!("{prefix}_kafka_p99_vs_loaded_hop"));
        if loaded.is_nan() || ratio.is_nan() {
            return None;
        }
        Some(format!(
            "the hop under this run's load had p99 {loaded:.1} ms (alone {:.1} ms); \
             ours / that = {ratio:.2}",
            self.get(&format!("raw_{prefix}_kafka_p99_ms"))
        ))
    }

    /// A missed end-to-end target read against the sink's insert cadence
    /// (the default floor between inserts holds every row up to that long)
    /// and against the run without it.
    fn cadence_note(&self, prefix: &str) -> Option<String> {
        let interval = self.get("consumer_min_insert_interval_ms");
        let floor0 = self.get(&format!("{prefix}_floor0_p99_ms"));
        let loaded = self.get(&format!("{prefix}_floor0_p99_vs_loaded_floor"));
        if interval.is_nan() || floor0.is_nan() || loaded.is_nan() {
            return None;
        }
        let mut note = format!(
            "the default cadence holds a row up to {interval:.0} ms for the next insert; \
             without it p99 {floor0:.1} ms = {:.2} × the floor, {loaded:.2} × (the hop under \
             that run's load + a lone insert)",
            self.get(&format!("{prefix}_floor0_p99_vs_floor"))
        );
        let both = self.get(&format!("{prefix}_floor0_p99_vs_loaded_hops"));
        if !both.is_nan() {
            note.push_str(&format!(
                ", {both:.2} × (hop + insert, both under that load)"
            ));
        }
        Some(note)
    }

    /// Why the latency target was missed, from the floors of the same run:
    /// the broker hop alone and a lone ClickHouse insert are what the
    /// pipeline's latency cannot go below, whatever our code does.
    fn latency_floor_note(&self) -> Option<String> {
        let broker = self.get("raw_e2e_kafka_p99_ms");
        let insert = self.get("raw_insert_small_p50_ms");
        if broker.is_nan() || insert.is_nan() {
            return None;
        }
        let floor = broker + insert;
        let ours_to_kafka = self.get("e2e_kafka_p99_ms");
        // The floors are taken with the pipeline stopped; a busy machine is
        // what they do not show.
        let cpu = self.get("e2e_cpu_busy_pct");
        let cpu = if cpu.is_nan() {
            String::new()
        } else {
            format!("; the CPUs were {cpu:.0}% busy during the run")
        };
        Some(if floor >= E2E_P99_TARGET_MS {
            format!(
                "out of reach in this run: the broker hop alone had p99 {broker:.1} ms, \
                 plus a lone 20-row insert's p50 {insert:.1} ms = {floor:.1} ms ≥ {E2E_P99_TARGET_MS} ms{cpu}"
            )
        } else {
            format!(
                "the floors of this run (broker hop alone p99 {broker:.1} ms + a lone insert's p50 \
                 {insert:.1} ms = {floor:.1} ms) left {:.1} ms; ours to Kafka took p99 {ours_to_kafka:.1} ms{cpu}",
                E2E_P99_TARGET_MS - floor
            )
        })
    }

    pub fn print_verdicts(&self) {
        println!("targets");
        for verdict in self.verdicts() {
            println!(
                "  {:<42} {:>10} {:<8} {}",
                verdict.label,
                shown(verdict.value),
                verdict.bound.to_string(),
                if verdict.met { "met" } else { "NOT MET" }
            );
            if let Some(note) = &verdict.note {
                println!("      {note}");
            }
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
        let targets: Map<String, Value> = self
            .verdicts()
            .into_iter()
            .map(|verdict| {
                (
                    verdict.key.to_string(),
                    json!({
                        "target": verdict.bound.to_string(),
                        "met": verdict.met,
                        "note": verdict.note,
                    }),
                )
            })
            .collect();
        map.insert("targets".into(), Value::Object(targets));
        map.insert("size".into(), json!(self.size));
        map.insert("machine".into(), self.machine.clone());
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(map))?)?;
        Ok(())
    }

    pub fn write_svg(&self, path: &Path) -> anyhow::Result<()> {
        let summary = self.machine["summary"].as_str().unwrap_or("?");
        let svg = crate::svg::render(&self.size, summary, &self.latencies, &self.timelines);
        std::fs::write(path, svg)?;
        Ok(())
    }
}

/// The rows each steady rate has: the CPU of every process and the time
/// budget of an event (keys as `main` records them).
fn per_rate_rows() -> Vec<(String, String, &'static str)> {
    let mut rows = Vec::new();
    for (prefix, rate) in [("e2e", "1k"), ("e2e_5k", "5k")] {
        rows.push((
            format!("{prefix}_hop_loaded_p50_ms"),
            format!("hop @ {rate}/s under the run's load, p50 (probe)"),
            "ms",
        ));
        rows.push((
            format!("{prefix}_hop_loaded_p99_ms"),
            format!("hop @ {rate}/s under the run's load, p99 (probe)"),
            "ms",
        ));
        rows.push((
            format!("raw_{prefix}_cpu_s_per_1k"),
            format!("CPU @ {rate}/s: raw producer + tap"),
            "s/1k ev",
        ));
        for (process, label) in [
            ("relay", "relay"),
            ("consumer", "consumer"),
            ("postgres", "PostgreSQL"),
            ("broker", "broker"),
            ("clickhouse", "ClickHouse"),
            ("bench", "the bench itself"),
        ] {
            rows.push((
                format!("{prefix}_cpu_s_per_1k_{process}"),
                format!("CPU @ {rate}/s: {label}"),
                "s/1k ev",
            ));
        }
        for (who, key, what, unit) in [
            ("relay", "batch", "events per batch", "events"),
            ("relay", "claim_ms", "an event's claim", "ms"),
            ("relay", "publish_ms", "an event's publish", "ms"),
            ("relay", "ack_ms", "an event's ack", "ms"),
            ("consumer", "batch", "records per batch", "records"),
            ("consumer", "poll_ms", "a record's poll", "ms"),
            ("consumer", "write_ms", "a record's insert", "ms"),
        ] {
            rows.push((
                format!("{prefix}_{who}_{key}"),
                format!("{who} @ {rate}/s: {what}"),
                unit,
            ));
        }
    }
    rows
}

const E2E_P99_TARGET_MS: f64 = 50.0;

/// The targets (issue #5, then #15: ratios to the limits of the same run),
/// in the order the verdict lists them.
const TARGETS: [Target; 19] = [
    Target {
        key: "relay_vs_naive",
        label: "relay / original design",
        bound: Bound::AtLeast(20.0),
    },
    Target {
        key: "relay_vs_limit",
        label: "relay / min(raw produce, raw claim)",
        bound: Bound::AtLeast(0.9),
    },
    Target {
        key: "sink_vs_limit",
        label: "consumer / min(raw consume, raw insert)",
        bound: Bound::AtLeast(0.9),
    },
    Target {
        key: "relay3_vs_relay",
        label: "3 relays / 1 relay",
        bound: Bound::AtLeast(1.0),
    },
    Target {
        key: "e2e_kafka_p99_vs_raw",
        label: "to Kafka p99 / raw hop p99 @ 1k/s",
        bound: Bound::AtMost(1.5),
    },
    Target {
        key: "e2e_5k_kafka_p99_vs_raw",
        label: "to Kafka p99 / raw hop p99 @ 5k/s",
        bound: Bound::AtMost(1.5),
    },
    Target {
        key: "e2e_p99_vs_floor",
        label: "e2e p99 / (hop + insert) p99 @ 1k/s",
        bound: Bound::AtMost(1.5),
    },
    Target {
        key: "e2e_5k_p99_vs_floor",
        label: "e2e p99 / (hop + insert) p99 @ 5k/s",
        bound: Bound::AtMost(1.5),
    },
    Target {
        key: "table_rows_vs_typed",
        label: "table-driven rows / typed mapper (rows/s)",
        bound: Bound::AtLeast(0.8),
    },
    Target {
        key: "wal_relay_vs_raw_produce",
        label: "WAL relay / raw produce",
        bound: Bound::AtLeast(0.8),
    },
    Target {
        key: "wal_pg_cpu_vs_outbox",
        label: "PostgreSQL CPU per event @ 1k/s, WAL / outbox",
        bound: Bound::AtMost(0.5),
    },
    Target {
        key: "wal_e2e_p99_vs_floor",
        label: "WAL e2e p99 / (hop + insert) p99 @ 1k/s",
        bound: Bound::AtMost(1.5),
    },
    Target {
        key: "relay_cpu_vs_raw",
        label: "relay CPU / raw producer CPU",
        bound: Bound::AtMost(1.5),
    },
    Target {
        key: "consumer_cpu_vs_raw",
        label: "consumer CPU / raw consume + insert",
        bound: Bound::AtMost(1.5),
    },
    Target {
        key: "e2e_p99_ms",
        label: "e2e p99 @ 1k/s (ms)",
        bound: Bound::AtMost(E2E_P99_TARGET_MS),
    },
    Target {
        key: "relay_rss_mb",
        label: "relay peak RSS (MiB)",
        bound: Bound::AtMost(100.0),
    },
    Target {
        key: "relay3_rss_mb",
        label: "largest of 3 relays, peak RSS (MiB)",
        bound: Bound::AtMost(100.0),
    },
    Target {
        key: "consumer_rss_mb",
        label: "consumer peak RSS (MiB)",
        bound: Bound::AtMost(100.0),
    },
    // "Does not grow with the events processed": within half of a new
    // table's cost, which single slow batches on this machine stay under.
    Target {
        key: "claim_vacuumed_vs_empty",
        label: "claim after backlog + vacuum / new table",
        bound: Bound::AtMost(1.5),
    },
];

struct Target {
    key: &'static str,
    label: &'static str,
    bound: Bound,
}

/// Which side of its bound a figure must be on.
#[derive(Clone, Copy)]
pub enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::AtLeast(bound) => write!(f, "≥ {bound}"),
            Bound::AtMost(bound) => write!(f, "≤ {bound}"),
        }
    }
}

/// One target held against one run. A figure the run lacks (NaN, as with
/// `--latency-only`) is not met.
pub struct Verdict {
    pub key: &'static str,
    pub label: &'static str,
    pub value: f64,
    pub bound: Bound,
    pub met: bool,
    pub note: Option<String>,
}

/// The table's unit column of `key`: the bound the verdict holds it to
/// where it is a target (one source for both, so that they cannot
/// disagree), else `unit`.
fn unit_column(key: &str, unit: &str) -> String {
    match TARGETS.iter().find(|target| target.key == key) {
        Some(target) => format!("({})", target.bound),
        None => unit.to_string(),
    }
}

fn shown(value: f64) -> String {
    if value.is_nan() {
        "-".to_string()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        // CPU seconds per 1,000 events are small.
        format!("{value:.3}")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The verdict on `key` of a report holding just `figures`.
    fn verdict(figures: &[(&str, f64)], key: &str) -> Result<Verdict, String> {
        let mut report = Report::new("test".into(), json!({}));
        for (name, value) in figures {
            report.figure(name, *value);
        }
        report
            .verdicts()
            .into_iter()
            .find(|v| v.key == key)
            .ok_or_else(|| format!("no target {key}"))
    }

    /// The throughput rows once said ≥ 0.8 where the verdict held 0.9.
    #[test]
    fn the_table_shows_each_target_with_the_verdicts_bound() {
        assert_eq!(unit_column("sink_vs_limit", ""), "(≥ 0.9)");
        assert_eq!(unit_column("relay_vs_limit", "(≥ 0.8)"), "(≥ 0.9)");
        assert_eq!(unit_column("raw_produce_eps", "msg/s"), "msg/s");
    }

    /// The latency ratios take the floor of their own rate, the CPU ratio
    /// the raw hops the consumer stands for.
    #[test]
    fn ratios_are_taken_against_the_limits_of_the_same_rate() {
        let mut report = Report::new("test".into(), json!({}));
        for (name, value) in [
            ("e2e_kafka_p99_ms", 60.0),
            ("raw_e2e_kafka_p99_ms", 30.0),
            ("e2e_5k_kafka_p99_ms", 90.0),
            ("raw_e2e_5k_kafka_p99_ms", 45.0),
            ("e2e_5k_hop_loaded_p99_ms", 60.0),
            ("e2e_5k_p99_ms", 100.0),
            ("raw_insert_small_p99_ms", 5.0),
            ("consumer_cpu_s_per_1k", 0.3),
            ("raw_consume_cpu_s_per_1k", 0.1),
            ("raw_insert_cpu_s_per_1k", 0.1),
        ] {
            report.figure(name, value);
        }
        report.derive_ratios();
        assert_eq!(report.get("e2e_kafka_p99_vs_raw"), 2.0);
        assert_eq!(report.get("e2e_5k_kafka_p99_vs_raw"), 2.0);
        assert_eq!(report.get("e2e_5k_kafka_p99_vs_loaded_hop"), 1.5);
        assert_eq!(report.get("e2e_5k_p99_vs_floor"), 2.0);
        assert!((report.get("consumer_cpu_vs_raw") - 1.5).abs() < 1e-9);
        assert!(
            report.get("e2e_p99_vs_floor").is_nan(),
            "no e2e p99 at 1k/s"
        );
    }

    /// The per-rate rows name the keys `main` records.
    #[test]
    fn per_rate_rows_cover_both_rates_and_every_process() {
        let keys: Vec<String> = per_rate_rows().into_iter().map(|(k, _, _)| k).collect();
        for key in [
            "raw_e2e_cpu_s_per_1k",
            "e2e_cpu_s_per_1k_bench",
            "e2e_5k_cpu_s_per_1k_broker",
            "e2e_relay_batch",
            "e2e_5k_relay_publish_ms",
            "e2e_5k_consumer_write_ms",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} missing");
        }
        assert_eq!(keys.len(), 2 * (2 + 1 + 6 + 7));
    }

    #[test]
    fn bounds_hold_both_ways_and_a_missing_figure_is_not_met() -> Result<(), String> {
        let figures = [("relay_vs_naive", 20.0), ("consumer_rss_mb", 100.5)];
        assert!(verdict(&figures, "relay_vs_naive")?.met);
        assert!(!verdict(&figures, "consumer_rss_mb")?.met);
        assert!(
            !verdict(&figures, "sink_vs_limit")?.met,
            "NaN must not pass"
        );
        Ok(())
    }

    #[test]
    fn a_missed_latency_target_names_the_floor_of_the_run() -> Result<(), String> {
        let missed = |floors: &[(&'static str, f64)]| -> Result<String, String> {
            let mut figures = vec![("e2e_p99_ms", 80.0)];
            figures.extend_from_slice(floors);
            verdict(&figures, "e2e_p99_ms")?
                .note
                .ok_or_else(|| "a missed target without a note".to_string())
        };

        let note = missed(&[
            ("raw_e2e_kafka_p99_ms", 45.0),
            ("raw_insert_small_p50_ms", 10.0),
        ])?;
        assert!(note.starts_with("out of reach"), "{note}");
        assert!(note.contains("55.0 ms"), "{note}");

        let note = missed(&[
            ("e2e_kafka_p99_ms", 60.0),
            ("raw_e2e_kafka_p99_ms", 30.0),
            ("raw_insert_small_p50_ms", 5.0),
        ])?;
        assert!(note.contains("left 15.0 ms"), "{note}");
        assert!(!note.contains("CPU"), "{note}");

        let note = missed(&[
            ("raw_e2e_kafka_p99_ms", 30.0),
            ("raw_insert_small_p50_ms", 5.0),
            ("e2e_cpu_busy_pct", 93.6),
        ])?;
        assert!(
            note.ends_with("the CPUs were 94% busy during the run"),
            "{note}"
        );

        assert!(verdict(&[("e2e_p99_ms", 40.0)], "e2e_p99_ms")?
            .note
            .is_none());
        Ok(())
    }

    /// A missed latency ratio says how it reads against the hop under the
    /// run's own load and without the insert cadence; a met one says nothing.
    #[test]
    fn missed_latency_ratios_carry_their_loaded_and_cadence_readings() -> Result<(), String> {
        let figures = [
            ("e2e_5k_kafka_p99_ms", 120.0),
            ("raw_e2e_5k_kafka_p99_ms", 40.0),
            ("e2e_5k_hop_loaded_p99_ms", 100.0),
            ("e2e_5k_p99_ms", 300.0),
            ("raw_insert_small_p99_ms", 10.0),
            ("consumer_min_insert_interval_ms", 200.0),
            ("e2e_5k_floor0_p99_ms", 110.0),
            ("e2e_5k_floor0_hop_loaded_p99_ms", 100.0),
            ("e2e_5k_floor0_insert_loaded_p99_ms", 10.0),
        ];
        let derived = |key: &str| {
            let mut report = Report::new("test".into(), json!({}));
            for (name, value) in figures {
                report.figure(name, value);
            }
            report.derive_ratios();
            report
                .verdicts()
                .into_iter()
                .find(|v| v.key == key)
                .ok_or_else(|| format!("no target {key}"))
        };
        let kafka = derived("e2e_5k_kafka_p99_vs_raw")?;
        assert!(!kafka.met);
        let note = kafka.note.ok_or("no note on a missed to-Kafka target")?;
        assert!(note.contains("p99 100.0 ms (alone 40.0 ms)"), "{note}");
        assert!(note.ends_with("ours / that = 1.20"), "{note}");

        let e2e = derived("e2e_5k_p99_vs_floor")?;
        let note = e2e.note.ok_or("no note on a missed e2e target")?;
        assert!(note.contains("up to 200 ms"), "{note}");
        assert!(note.contains("p99 110.0 ms = 2.20 × the floor"), "{note}");
        assert!(note.contains("1.00 × (the hop under"), "{note}");
        assert!(
            note.ends_with("1.00 × (hop + insert, both under that load)"),
            "{note}"
        );

        let met = verdict(
            &[
                ("e2e_kafka_p99_vs_raw", 1.2),
                ("e2e_hop_loaded_p99_ms", 30.0),
            ],
            "e2e_kafka_p99_vs_raw",
        )?;
        assert!(met.met && met.note.is_none());
        Ok(())
    }

    #[test]
    fn percentiles_are_named_by_quantile() {
        let mut report = Report::new("test".into(), json!({}));
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        report.percentiles("e2e_flag", &values, &[0.5, 0.99, 1.0]);
        assert_eq!(report.get("e2e_flag_p50_ms"), 51.0);
        assert_eq!(report.get("e2e_flag_p99_ms"), 99.0);
        assert_eq!(report.get("e2e_flag_max_ms"), 100.0);
    }
}
