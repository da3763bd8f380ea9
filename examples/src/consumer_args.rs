//! The consumer's options (`consumer_to_clickhouse`): which partitions it
//! reads, how it batches, how records become rows. Every default comes from
//! the library's config structs.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use outbox_core::ConsumeConfig;
use outbox_kafka::{Assignment, ConsumerConfig, LagProbe};
use outbox_pg::PartitionLeaseConfig;

use sink_clickhouse::TableRowsConfig;

use crate::routes::{ChangesArg, MissingArg, UnknownArg};
use crate::{millis, GroupArgs};

/// How the consumer obtains its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AssignmentArg {
    /// Read every partition of the topic (one consumer per topic; exactly-once).
    AllPartitions,
    /// Let the broker's consumer group split partitions among consumers.
    Group,
    /// Share partitions with the other consumers of the group through
    /// PostgreSQL leases: each partition has one writer, and a dead
    /// consumer's partitions are taken over within the lease timeout.
    Leased,
}

impl From<AssignmentArg> for Assignment {
    fn from(arg: AssignmentArg) -> Self {
        match arg {
            AssignmentArg::AllPartitions => Assignment::AllPartitions,
            AssignmentArg::Group => Assignment::Group,
            AssignmentArg::Leased => Assignment::Leased,
        }
    }
}

/// How records become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RowFormat {
    /// The demo's `user_logins` columns parsed from the JSON payload.
    UserLogins,
    /// The whole event envelope (topic, key, payload, headers, created_at).
    Raw,
    /// The JSON payload's fields into the existing table's columns, by name
    /// (see --field, --missing-field, --unknown-field).
    Table,
}

/// The Kafka consumer's defaults (the options take theirs from here).
fn consumer_defaults() -> ConsumerConfig {
    ConsumerConfig::new("", Vec::<String>::new())
}

/// Everything the consumer is told on its command line, apart from the services.
#[derive(Debug, Clone, Args)]
pub struct ConsumerArgs {
    #[command(flatten)]
    pub group: GroupArgs,
    /// How partitions are obtained.
    #[arg(
        long,
        env = "OUTBOX_ASSIGNMENT",
        value_enum,
        default_value = "all-partitions"
    )]
    pub assignment: AssignmentArg,
    /// How records become rows.
    #[arg(
        long,
        env = "OUTBOX_ROW_FORMAT",
        value_enum,
        default_value = "user-logins"
    )]
    pub format: RowFormat,
    /// With --format table: column=field, or column=/json/pointer for a
    /// nested field (repeat the flag; other columns read the field of
    /// their own name).
    #[arg(long = "field", env = "OUTBOX_FIELDS", value_delimiter = ',', value_parser = crate::routes::parse_field)]
    pub fields: Vec<(String, String)>,
    /// With --format table: a payload without a value for a column.
    #[arg(
        long,
        env = "OUTBOX_MISSING_FIELD",
        value_enum,
        default_value = "default"
    )]
    pub missing_field: MissingArg,
    /// With --format table: a payload field no column reads.
    #[arg(
        long,
        env = "OUTBOX_UNKNOWN_FIELD",
        value_enum,
        default_value = "ignore"
    )]
    pub unknown_field: UnknownArg,
    /// With --format table: payloads are rows (`off`), or change envelopes
    /// of the WAL source written one row per change (`log`) or as each
    /// key's latest state (`state`, docs/tables.md).
    #[arg(long, env = "OUTBOX_CHANGES", value_enum, default_value = "off")]
    pub changes: ChangesArg,
    /// With --changes state and --create-columns: the primary key the
    /// created table is ordered by.
    #[arg(long, env = "OUTBOX_ORDER_BY")]
    pub order_by: Option<String>,
    /// With --format table: columns (`name Type, ...`, without the four
    /// meta columns) to create the table with when it does not exist.
    #[arg(long, env = "OUTBOX_CREATE_COLUMNS")]
    pub create_columns: Option<String>,
    /// With --format table: a String column that gets each record's trace
    /// id (from its W3C `traceparent` header), to find a row's trace.
    #[arg(long, env = "OUTBOX_TRACE_ID_COLUMN")]
    pub trace_id_column: Option<String>,
    /// With --format table: how often the table's columns are read again (s).
    #[arg(long, env = "OUTBOX_COLUMNS_REFRESH_SECS", default_value_t = TableRowsConfig::default().refresh_interval.as_secs())]
    pub columns_refresh_secs: u64,
    /// How often the consumer-lag gauge is refreshed (s).
    #[arg(long, env = "OUTBOX_LAG_INTERVAL_SECS", default_value_t = LagProbe::REPORT_INTERVAL.as_secs())]
    pub lag_interval_secs: u64,
    /// With --assignment leased: how long a silent consumer keeps its partitions (ms).
    #[arg(long, env = "OUTBOX_LEASE_TIMEOUT_MS", default_value_t = millis(PartitionLeaseConfig::new("", "", 1).session_timeout))]
    pub lease_timeout_ms: u64,
    /// Most records per ClickHouse insert.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = ConsumeConfig::default().batch_size)]
    pub batch_size: usize,
    /// Least time between two inserts into the table (ms): a batch that is
    /// not full keeps collecting until then, so ClickHouse gets few, large
    /// inserts (parts) to merge. 0 inserts as soon as a batch is read
    /// (lowest latency, most parts; docs/performance.md).
    #[arg(long, env = "OUTBOX_MIN_INSERT_INTERVAL_MS", default_value_t = millis(ConsumeConfig::default().min_write_interval))]
    pub min_insert_interval_ms: u64,
    /// Longest wait to fill a batch (ms).
    #[arg(long, env = "OUTBOX_BATCH_WAIT_MS", default_value_t = millis(ConsumeConfig::default().max_wait))]
    pub batch_wait_ms: u64,
    /// After the first record of a batch, how long to keep collecting more
    /// (ms). Low load gets small batches soon; high load gets big ones
    /// anyway, because records pile up while the previous batch is written.
    #[arg(long, env = "OUTBOX_BATCH_LINGER_MS", default_value_t = millis(consumer_defaults().batch_linger))]
    pub batch_linger_ms: u64,
    /// How long the broker may hold a fetch that finds nothing (ms,
    /// `fetch.wait.max.ms`). tansu 0.6 waits it out on every fetch, so it adds
    /// to latency there; lower costs more idle fetches.
    #[arg(long, env = "OUTBOX_FETCH_WAIT_MS", default_value_t = millis(consumer_defaults().fetch_wait))]
    pub fetch_wait_ms: u64,
    /// Most bytes one fetch response may carry (`fetch.max.bytes`): less
    /// bounds memory while catching up a backlog, more catches up faster.
    #[arg(long, env = "OUTBOX_FETCH_MAX_BYTES", default_value_t = consumer_defaults().fetch_max_bytes)]
    pub fetch_max_bytes: u32,
    /// Kafka session timeout (ms).
    #[arg(long, env = "OUTBOX_SESSION_TIMEOUT_MS", default_value_t = millis(consumer_defaults().session_timeout))]
    pub session_timeout_ms: u64,
    /// Kafka max poll interval (ms): also how long a rejoin waits for a member that died.
    #[arg(long, env = "OUTBOX_MAX_POLL_INTERVAL_MS", default_value_t = millis(consumer_defaults().max_poll_interval))]
    pub max_poll_interval_ms: u64,
    /// Exit after this many seconds without any record.
    #[arg(long, env = "OUTBOX_EXIT_AFTER_IDLE_SECS")]
    pub exit_after_idle_secs: Option<u64>,
}

impl ConsumerArgs {
    /// The consumer loop's settings, checked.
    pub fn consume_config(&self) -> anyhow::Result<ConsumeConfig> {
        let config = ConsumeConfig {
            batch_size: self.batch_size,
            max_wait: Duration::from_millis(self.batch_wait_ms),
            min_write_interval: Duration::from_millis(self.min_insert_interval_ms),
            stop_after_idle: self.exit_after_idle_secs.map(Duration::from_secs),
            ..ConsumeConfig::default()
        };
        config
            .validate()
            .context("invalid consumer configuration")?;
        Ok(config)
    }

    /// The Kafka consumer's settings.
    pub fn consumer_config(&self) -> ConsumerConfig {
        ConsumerConfig {
            session_timeout: Duration::from_millis(self.session_timeout_ms),
            max_poll_interval: Duration::from_millis(self.max_poll_interval_ms),
            batch_linger: Duration::from_millis(self.batch_linger_ms),
            fetch_wait: Duration::from_millis(self.fetch_wait_ms),
            fetch_max_bytes: self.fetch_max_bytes,
            assignment: self.assignment.into(),
            ..ConsumerConfig::new(self.group.group_id.clone(), [self.group.topic.clone()])
        }
    }

    /// The partition leases of `--assignment leased`, for a topic of `partitions`.
    pub fn lease_config(&self, partitions: i32) -> PartitionLeaseConfig {
        PartitionLeaseConfig::new(
            self.group.group_id.clone(),
            self.group.topic.clone(),
            partitions,
        )
        .with_session_timeout(Duration::from_millis(self.lease_timeout_ms))
    }

    /// With --format table: how payloads map to the table's columns.
    pub fn table_rows(&self) -> TableRowsConfig {
        TableRowsConfig {
            fields: self.fields.iter().cloned().collect(),
            missing: self.missing_field.into(),
            unknown: self.unknown_field.into(),
            refresh_interval: crate::routes::refresh(self.columns_refresh_secs),
            create_columns: self.create_columns.clone(),
            changes: self.changes.into(),
            order_by: self.order_by.clone(),
            trace_id_column: self.trace_id_column.clone(),
            ..TableRowsConfig::default()
        }
    }

    /// How often the lag gauge is refreshed (at least every second).
    pub fn lag_interval(&self) -> Duration {
        Duration::from_secs(self.lag_interval_secs.max(1))
    }
}
