//! Every metric the pipeline's crates export: name, kind, labels and help.
//!
//! The catalog is the one list that the code, the alert rules, the
//! dashboard and the docs agree on. A binary calls [`describe`] with the
//! parts it runs once its recorder is installed, so `/metrics` carries a
//! `# HELP` line for each and the counters start at zero: an alert on
//! `increase(…) > 0` sees the very first dead letter or error, which a
//! series born at 1 would hide.
//!
//! ```
//! use outbox_core::metrics_catalog::{self, MetricKind};
//!
//! let published = metrics_catalog::find("outbox_relay_events_published_total");
//! assert_eq!(published.map(|m| m.kind), Some(MetricKind::Counter));
//! // Histograms are exported as `_bucket`, `_sum` and `_count` series.
//! assert!(metrics_catalog::find("outbox_sink_write_seconds_bucket").is_some());
//! ```

use crate::Stage;

/// How a metric is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (`_total`).
    Counter,
    /// Set to the latest reading.
    Gauge,
    /// Observations in buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// One exported metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// Its name on `/metrics`.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The labels its series carry (none: one series).
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: MetricKind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

use MetricKind::{Counter, Gauge, Histogram};

/// Metrics of every long-running binary.
pub const COMMON: &[Metric] = &[
    metric(
        "outbox_errors_total",
        Counter,
        &["loop", "stage", "class"],
        "Failures by loop (relay, consume), stage (source, bus, sink, config) and class (retryable: retried; permanent: the loop stopped).",
    ),
    metric(
        "outbox_stage_up",
        Gauge,
        &["stage"],
        "1 when the service behind the stage answered its last request, else 0 (what /readyz reports).",
    ),
];

/// Metrics of the relay loop (any source).
pub const RELAY: &[Metric] = &[
    metric(
        "outbox_relay_events_claimed_total",
        Counter,
        &[],
        "Events the relay claimed from its source.",
    ),
    metric(
        "outbox_relay_events_published_total",
        Counter,
        &[],
        "Events the broker acknowledged.",
    ),
    metric(
        "outbox_relay_events_dead_lettered_total",
        Counter,
        &[],
        "Events moved to the source's dead-letter table.",
    ),
    metric(
        "outbox_relay_events_released_total",
        Counter,
        &[],
        "Events released unpublished, to be claimed again.",
    ),
    metric(
        "outbox_relay_key_order_gaps_total",
        Counter,
        &[],
        "Keys found published out of order (should stay 0; see GUARANTEES.md).",
    ),
    metric(
        "outbox_relay_batch_size",
        Histogram,
        &[],
        "Events per claimed batch.",
    ),
    metric(
        "outbox_relay_claim_seconds",
        Histogram,
        &[],
        "Time to claim one batch from the source.",
    ),
    metric(
        "outbox_relay_publish_seconds",
        Histogram,
        &[],
        "Time to hand one batch to the producer.",
    ),
    metric(
        "outbox_relay_ack_seconds",
        Histogram,
        &[],
        "Time from a batch's hand-off to the broker's last acknowledgement.",
    ),
];

/// Metrics of a relay on the outbox or flag table: its backlog.
pub const RELAY_TABLE: &[Metric] = &[
    metric(
        "outbox_backlog_events",
        Gauge,
        &[],
        "Events (or unsent rows) waiting in the source table.",
    ),
    metric(
        "outbox_oldest_pending_age_seconds",
        Gauge,
        &[],
        "Age of the oldest waiting event (0 when none waits).",
    ),
];

/// Metrics of a relay on the WAL source.
pub const RELAY_WAL: &[Metric] = &[
    metric(
        "outbox_wal_retained_bytes",
        Gauge,
        &["slot"],
        "WAL the server keeps for the slot (from its restart position).",
    ),
    metric(
        "outbox_wal_unconfirmed_bytes",
        Gauge,
        &["slot"],
        "WAL between the slot's confirmed position and the server's current one.",
    ),
    metric(
        "outbox_wal_queued_events",
        Gauge,
        &["slot"],
        "Decoded events waiting for a claim in the relay.",
    ),
    metric(
        "outbox_wal_in_progress_bytes",
        Gauge,
        &["slot"],
        "Bytes of large transactions streamed while they run, held in memory until their commit.",
    ),
    metric(
        "outbox_wal_spilled_bytes_total",
        Counter,
        &["slot"],
        "Bytes of large uncommitted transactions written to the relay's spill files.",
    ),
];

/// Metrics of the consume loop and the ClickHouse sink.
pub const CONSUMER: &[Metric] = &[
    metric(
        "outbox_consumer_records_total",
        Counter,
        &[],
        "Records read from the bus and handed to the sink.",
    ),
    metric(
        "outbox_consumer_fenced_batches_total",
        Counter,
        &[],
        "Batches dropped because the partition's lease moved to another consumer.",
    ),
    metric(
        "outbox_consumer_batch_size",
        Histogram,
        &[],
        "Records per written batch.",
    ),
    metric(
        "outbox_consumer_lag",
        Gauge,
        &["topic", "partition"],
        "Records of the partition that the consumer group has not committed.",
    ),
    metric(
        "outbox_sink_rows_written_total",
        Counter,
        &[],
        "Rows the sink wrote.",
    ),
    metric(
        "outbox_sink_duplicates_total",
        Counter,
        &[],
        "Records skipped because the sink already held their event id.",
    ),
    metric(
        "outbox_sink_dead_lettered_total",
        Counter,
        &[],
        "Records written to the sink's dead-letter table instead.",
    ),
    metric(
        "outbox_sink_dedup_overruns_total",
        Counter,
        &[],
        "Event ids the dedup window forgot younger than its horizon.",
    ),
    metric(
        "outbox_sink_write_seconds",
        Histogram,
        &[],
        "Time to write one batch to the sink.",
    ),
    metric(
        "outbox_sink_inserts_total",
        Counter,
        &["table"],
        "INSERT statements the sink sent, by table.",
    ),
    metric(
        "outbox_sink_active_parts",
        Gauge,
        &["table"],
        "Active parts of the sink's table (ClickHouse refuses inserts above parts_to_throw_insert).",
    ),
];

/// Every part of the catalog.
pub const ALL: &[&[Metric]] = &[COMMON, RELAY, RELAY_TABLE, RELAY_WAL, CONSUMER];

/// The metric a `/metrics` series name belongs to: its own name, or a
/// histogram's `_bucket`, `_sum` or `_count` series.
pub fn find(series: &str) -> Option<&'static Metric> {
    let all = || ALL.iter().flat_map(|part| part.iter());
    all().find(|m| m.name == series).or_else(|| {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| series.strip_suffix(suffix))?;
        all().find(|m| m.name == base && m.kind == Histogram)
    })
}

/// Describes `metrics` to the installed recorder and registers the series
/// that exist from the start at zero: those without labels, and
/// `outbox_errors_total` of `loop_name` for each of `stages` (and
/// [`Stage::Config`]) in both classes.
///
/// Call it once after installing the recorder; without one it does nothing.
pub fn describe(loop_name: &'static str, stages: &[Stage], metrics: &[Metric]) {
    for m in metrics {
        match m.kind {
            Counter => metrics::describe_counter!(m.name, m.help),
            Gauge => metrics::describe_gauge!(m.name, m.help),
            Histogram => metrics::describe_histogram!(m.name, m.help),
        }
        if m.name == "outbox_errors_total" {
            let config = (!stages.contains(&Stage::Config)).then_some(Stage::Config);
            for &stage in stages.iter().chain(config.iter()) {
                for retryable in [true, false] {
                    error_counter(loop_name, stage, retryable).increment(0);
                }
            }
        }
        if !m.labels.is_empty() {
            continue;
        }
        match m.kind {
            Counter => metrics::counter!(m.name).increment(0),
            // Registering is enough: a new gauge reads 0, a new histogram
            // exports empty buckets.
            Gauge => drop(metrics::gauge!(m.name)),
            Histogram => drop(metrics::histogram!(m.name)),
        }
    }
}

/// The `outbox_errors_total` series of one loop, stage and class.
pub(crate) fn error_counter(
    loop_name: &'static str,
    stage: Stage,
    retryable: bool,
) -> metrics::Counter {
    let class = if retryable { "retryable" } else { "permanent" };
    metrics::counter!("outbox_errors_total", "loop" => loop_name, "stage" => stage.to_string(), "class" => class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prometheus_conventions_and_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for m in ALL.iter().flat_map(|part| part.iter()) {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("outbox_"), "{}", m.name);
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{} is not snake_case",
                m.name
            );
            assert_eq!(
                m.name.ends_with("_total"),
                m.kind == Counter,
                "{}: counters and only counters end in _total",
                m.name
            );
            assert!(!m.help.is_empty());
        }
    }

    #[test]
    fn histogram_series_find_their_metric() {
        assert_eq!(
            find("outbox_relay_ack_seconds_count").map(|m| m.name),
            Some("outbox_relay_ack_seconds")
        );
        assert!(find("outbox_relay_events_published_total_count").is_none());
        assert!(find("outbox_nothing").is_none());
    }
}
