//! The relay's options (`producer_pg_to_kafka`): what it reads and how it
//! batches. Every default comes from the library's config structs.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use outbox_core::RelayConfig;
use outbox_pg::{FlagTableConfig, OutboxConfig, ValidFlagTableConfig, ValidOutboxConfig};

use crate::OutboxTableArgs;

/// What the relay reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// A business table with a boolean "sent" column (the original demo).
    FlagTable,
    /// The outbox table written by `outbox_pg::Outbox::enqueue`.
    Outbox,
    /// The write-ahead log, through a logical replication slot: the changes
    /// of the captured tables (by default the flag table's, to its topic,
    /// keyed by its key column) and the events of `outbox_pg::Outbox::emit`.
    Wal,
}

/// The WAL source (`--source wal`).
#[derive(Debug, Clone, Args)]
pub struct WalArgs {
    /// Replication slot (created when missing).
    #[arg(long = "wal-slot", env = "OUTBOX_WAL_SLOT", default_value_t = outbox_pg::wal::WalConfig::default().slot)]
    pub slot: String,
    /// Publication naming the captured tables (created when missing).
    #[arg(long = "wal-publication", env = "OUTBOX_WAL_PUBLICATION", default_value_t = outbox_pg::wal::WalConfig::default().publication)]
    pub publication: String,
    /// A table to capture, as `schema.table` or `table`, optionally
    /// `=topic` (repeatable; comma-separated in the environment). Default:
    /// the flag table, to --topic, keyed by --key-column.
    #[arg(long = "wal-table", env = "OUTBOX_WAL_TABLES", value_delimiter = ',')]
    pub tables: Vec<String>,
    /// Topic of a captured table named without one; `{schema}` and
    /// `{table}` are replaced.
    #[arg(long = "wal-topic-template", env = "OUTBOX_WAL_TOPIC_TEMPLATE", default_value_t = outbox_pg::wal::WalConfig::default().topic_template)]
    pub topic_template: String,
    /// Prefix of the logical messages that carry `Outbox::emit` events.
    /// Every slot of a database sees every message: pipelines that share a
    /// database but not their events need prefixes of their own.
    #[arg(long = "wal-message-prefix", env = "OUTBOX_WAL_MESSAGE_PREFIX", default_value_t = outbox_pg::wal::WalConfig::default().message_prefix)]
    pub message_prefix: String,
    /// An outbox table to read from the WAL instead of claiming it: each
    /// inserted row is published as the event it holds (repeatable;
    /// comma-separated in the environment). Retire its rows in the writer's
    /// transaction with `Outbox::enqueue_and_delete`.
    #[arg(
        long = "wal-outbox-table",
        env = "OUTBOX_WAL_OUTBOX_TABLES",
        value_delimiter = ','
    )]
    pub outbox_tables: Vec<String>,
    /// Do not publish the rows the captured tables hold when the slot is
    /// created (the initial load): only the changes after it.
    #[arg(long = "wal-no-initial-load", env = "OUTBOX_WAL_NO_INITIAL_LOAD")]
    pub no_initial_load: bool,
    /// Rows per chunk of the initial load: what one short snapshot reads,
    /// and the most a load cut short reads again.
    #[arg(long = "wal-load-batch", env = "OUTBOX_WAL_LOAD_BATCH", default_value_t = outbox_pg::wal::WalConfig::default().load_batch)]
    pub load_batch: usize,
    /// Capture no table: publish only the events of `Outbox::emit` (the
    /// table-free outbox) and of `--wal-outbox-table`.
    #[arg(
        long = "wal-messages-only",
        env = "OUTBOX_WAL_MESSAGES_ONLY",
        conflicts_with = "tables"
    )]
    pub messages_only: bool,
    /// Receive each large transaction only once it committed (pgoutput
    /// protocol 1): the server holds it meanwhile, in memory and its own
    /// spill files. By default it is streamed while it runs (PostgreSQL 14
    /// and later) and held by the relay until its commit.
    #[arg(
        long = "wal-no-stream-in-progress",
        env = "OUTBOX_WAL_NO_STREAM_IN_PROGRESS"
    )]
    pub no_stream_in_progress: bool,
    /// The walsender's `logical_decoding_work_mem` for the relay's session,
    /// in kB (64 at least): larger transactions are streamed while they
    /// run. Default: the server's setting.
    #[arg(
        long = "wal-decoding-work-mem-kb",
        env = "OUTBOX_WAL_DECODING_WORK_MEM_KB"
    )]
    pub decoding_work_mem_kb: Option<u32>,
    /// Bytes of streamed, uncommitted transactions held in memory; past
    /// it, the largest continues in a spill file.
    #[arg(long = "wal-in-progress-memory", env = "OUTBOX_WAL_IN_PROGRESS_MEMORY", default_value_t = outbox_pg::wal::WalConfig::default().in_progress_memory)]
    pub in_progress_memory: usize,
    /// Directory of the spill files (unnamed, gone with the process).
    /// Default: the system's temporary directory.
    #[arg(long = "wal-spill-dir", env = "OUTBOX_WAL_SPILL_DIR")]
    pub spill_dir: Option<std::path::PathBuf>,
}

impl WalArgs {
    /// The WAL source these options describe, checked: the `--wal-table`s,
    /// or `default` (the flag table) when none is named and the source is
    /// not messages only. One function for the relay and `outbox
    /// create-wal-slot`, so the slot the command makes is the relay's.
    pub fn config(
        &self,
        default: outbox_pg::wal::CaptureTable,
        create: bool,
    ) -> anyhow::Result<outbox_pg::wal::WalConfig> {
        use outbox_pg::wal::{CaptureTable, WalConfig};
        let tables =
            if self.messages_only || (self.tables.is_empty() && !self.outbox_tables.is_empty()) {
                Vec::new()
            } else if self.tables.is_empty() {
                vec![default]
            } else {
                self.tables
                    .iter()
                    .map(|spec| match spec.split_once('=') {
                        Some((table, topic)) => {
                            CaptureTable::new(table.trim()).with_topic(topic.trim())
                        }
                        None => CaptureTable::new(spec.trim()),
                    })
                    .collect()
            };
        let config = WalConfig {
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            tables,
            topic_template: self.topic_template.clone(),
            message_prefix: self.message_prefix.clone(),
            outbox_tables: self.outbox_tables.clone(),
            initial_load: !self.no_initial_load,
            load_batch: self.load_batch,
            create,
            stream_in_progress: !self.no_stream_in_progress,
            decoding_work_mem_kb: self.decoding_work_mem_kb,
            in_progress_memory: self.in_progress_memory,
            spill_dir: self.spill_dir.clone(),
            ..WalConfig::default()
        };
        config
            .validate()
            .context("invalid WAL source configuration")?;
        Ok(config)
    }
}

/// A business table whose rows carry a "sent" flag (`--source flag-table`).
#[derive(Debug, Clone, Args)]
pub struct FlagTableArgs {
    /// Flag table (with --source flag-table).
    #[arg(long, env = "OUTBOX_FLAG_TABLE", default_value_t = FlagTableConfig::default().table)]
    pub table: String,
    /// Id column of the flag table.
    #[arg(long, env = "OUTBOX_FLAG_ID_COLUMN", default_value_t = FlagTableConfig::default().id_column)]
    pub id_column: String,
    /// Boolean "sent" column of the flag table.
    #[arg(long, env = "OUTBOX_FLAG_COLUMN", default_value_t = FlagTableConfig::default().flag_column)]
    pub flag_column: String,
    /// Column whose value is the message key (flag table).
    #[arg(
        long,
        env = "OUTBOX_FLAG_KEY_COLUMN",
        default_value_t = FlagTableConfig::default().key_column.unwrap_or_default()
    )]
    pub key_column: String,
    /// Timestamp column of the flag table that ages its unsent rows
    /// (`outbox_oldest_pending_age_seconds`, `outbox status`); empty: none.
    #[arg(
        long = "flag-time-column",
        env = "OUTBOX_FLAG_TIME_COLUMN",
        default_value_t = FlagTableConfig::default().time_column.unwrap_or_default()
    )]
    pub time_column: String,
}

impl FlagTableArgs {
    /// The flag table's names; the topic and limits are the defaults.
    pub fn config(&self) -> FlagTableConfig {
        FlagTableConfig {
            table: self.table.clone(),
            id_column: self.id_column.clone(),
            flag_column: self.flag_column.clone(),
            key_column: Some(self.key_column.clone()),
            time_column: (!self.time_column.is_empty()).then(|| self.time_column.clone()),
            ..FlagTableConfig::default()
        }
    }
}

/// Everything the relay is told on its command line, apart from the services.
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// What to read.
    #[arg(long, env = "OUTBOX_SOURCE", value_enum, default_value = "flag-table")]
    pub source: SourceKind,
    #[command(flatten)]
    pub flag: FlagTableArgs,
    /// Topic the flag table's rows go to.
    #[arg(long, env = "OUTBOX_TOPIC", default_value_t = FlagTableConfig::default().topic)]
    pub topic: String,
    /// Install (idempotently) a statement-level trigger on the flag table
    /// that wakes the relay at each insert's commit
    /// (`outbox_pg::flag_notify_sql`); needs the table's owner, and locks
    /// the table for a moment: for one relay, or a deployment step. Without it
    /// the relay wakes at a notification only if the trigger is already
    /// there (the demo's init.sql installs it), and otherwise polls every
    /// --idle-wait-ms.
    #[arg(long, env = "OUTBOX_FLAG_NOTIFY_TRIGGER")]
    pub flag_notify_trigger: bool,
    /// Publish events as CloudEvents (Kafka protocol binding, binary mode:
    /// `ce_*` headers) with this `ce_source` (a URI reference such as
    /// /orders-service) for events without their own.
    #[arg(long, env = "OUTBOX_CLOUDEVENTS_SOURCE", value_name = "URI")]
    pub cloudevents_source: Option<String>,
    /// With --cloudevents-source: only these topics' events (repeatable,
    /// or comma separated); default every topic.
    #[arg(
        long = "cloudevents-topic",
        env = "OUTBOX_CLOUDEVENTS_TOPICS",
        value_delimiter = ',',
        requires = "cloudevents_source"
    )]
    pub cloudevents_topics: Vec<String>,
    #[command(flatten)]
    pub tables: OutboxTableArgs,
    #[command(flatten)]
    pub wal: WalArgs,
    /// Do not create the outbox tables at start (for a role without DDL rights).
    #[arg(long, env = "OUTBOX_NO_MIGRATE")]
    pub no_migrate: bool,
    /// How long a claim may wait for the broker before Postgres ends it and
    /// its lanes go to another relay (s).
    #[arg(long, env = "OUTBOX_CLAIM_TIMEOUT_SECS", default_value_t = OutboxConfig::default().claim_timeout.as_secs())]
    pub claim_timeout_secs: u64,
    /// Most events per batch.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = RelayConfig::default().batch_size)]
    pub batch_size: usize,
    /// Batches in flight at once behind a backlog, with a source whose
    /// claims never share a key (the outbox: each claim owns its lanes, so
    /// keys keep their order). A flag table has one.
    #[arg(long, env = "OUTBOX_IN_FLIGHT_BATCHES", default_value_t = RelayConfig::default().max_in_flight_batches)]
    pub in_flight_batches: usize,
    /// Batches in flight at once while caught up (the last claim was not
    /// full): 1 sends what arrives meanwhile in one larger request, which
    /// a broker whose cost follows its requests needs; as many as
    /// --in-flight-batches for a distant broker with cheap requests.
    #[arg(long, env = "OUTBOX_CAUGHT_UP_IN_FLIGHT_BATCHES", default_value_t = RelayConfig::default().caught_up_in_flight_batches)]
    pub caught_up_in_flight_batches: usize,
    /// How long a claim that was not full stays open, taking the events
    /// that arrive in its lanes and publishing them as they come (ms; 0,
    /// the default: one publish per claim). Fewer claim transactions for a
    /// little latency; outbox source only.
    #[arg(long, env = "OUTBOX_CLAIM_WINDOW_MS", default_value_t = RelayConfig::default().claim_window.as_millis() as u64)]
    pub claim_window_ms: u64,
    /// Exit once nothing is pending instead of waiting for new events.
    #[arg(long, env = "OUTBOX_DRAIN")]
    pub drain: bool,
    /// How often the outbox backlog gauges are refreshed (s; each refresh
    /// counts the pending events, one scan of the outbox table).
    #[arg(
        long,
        env = "OUTBOX_BACKLOG_INTERVAL_SECS",
        default_value_t = outbox_pg::OutboxAdmin::REPORT_INTERVAL.as_secs()
    )]
    pub backlog_interval_secs: u64,
}

impl RelayArgs {
    /// How long a claim may wait for the broker.
    pub fn claim_timeout(&self) -> Duration {
        Duration::from_secs(self.claim_timeout_secs)
    }

    /// How often the backlog gauges are refreshed (at least every second).
    pub fn backlog_interval(&self) -> Duration {
        Duration::from_secs(self.backlog_interval_secs.max(1))
    }

    /// The relay loop's settings, checked.
    pub fn relay_config(&self) -> anyhow::Result<RelayConfig> {
        let config = RelayConfig {
            batch_size: self.batch_size,
            stop_when_idle: self.drain,
            max_in_flight_batches: self.in_flight_batches,
            caught_up_in_flight_batches: self.caught_up_in_flight_batches,
            claim_window: Duration::from_millis(self.claim_window_ms),
            ..RelayConfig::default()
        };
        config.validate().context("invalid relay configuration")?;
        Ok(config)
    }

    /// The outbox tables, checked.
    pub fn outbox_config(&self) -> anyhow::Result<ValidOutboxConfig> {
        OutboxConfig {
            claim_timeout: self.claim_timeout(),
            ..self.tables.config()
        }
        .validate()
        .context("invalid outbox configuration")
    }

    /// The WAL source's settings, checked.
    pub fn wal_config(&self) -> anyhow::Result<outbox_pg::wal::WalConfig> {
        let default = outbox_pg::wal::CaptureTable::new(self.flag.table.clone())
            .with_topic(self.topic.clone())
            .with_key_columns(&[self.flag.key_column.as_str()]);
        self.wal.config(default, !self.no_migrate)
    }

    /// The CloudEvents binding of the published events, if asked for.
    pub fn cloudevents(&self) -> anyhow::Result<Option<outbox_kafka::CloudEventsConfig>> {
        let Some(source) = &self.cloudevents_source else {
            return Ok(None);
        };
        let config = outbox_kafka::CloudEventsConfig {
            source: source.clone(),
            topics: self.cloudevents_topics.iter().cloned().collect(),
        };
        config
            .validate()
            .map_err(|reason| anyhow::anyhow!("--cloudevents-source: {reason}"))?;
        Ok(Some(config))
    }

    /// The flag table (its dead letters go to the outbox's dead-letter
    /// table), checked.
    pub fn flag_config(&self) -> anyhow::Result<ValidFlagTableConfig> {
        FlagTableConfig {
            topic: self.topic.clone(),
            dead_letter_table: self.tables.dead_letter_table.clone(),
            claim_timeout: self.claim_timeout(),
            ..self.flag.config()
        }
        .validate()
        .context("invalid flag-table configuration")
    }
}
