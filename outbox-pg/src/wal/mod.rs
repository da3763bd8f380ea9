//! Capture from the write-ahead log: a [`Source`](outbox_core::Source) that streams logical
//! replication (`pgoutput`) from a replication slot.
//!
//! Two kinds of events come out of one stream, in commit order:
//! - the changes of the captured tables (inserts, updates, deletes), each
//!   one event in the change envelope of `docs/wal.md`;
//! - the events services wrote with [`Outbox::emit`](crate::Outbox::emit)
//!   (logical decoding messages under the configured prefix): the
//!   table-free outbox.
//!
//! The slot's confirmed position moves only past transactions whose every
//! event the broker acknowledged (or that were dead-lettered), so a relay
//! that dies reads them again; their ids are deterministic, so the sink
//! recognises the ones it already wrote.

mod backfill;
mod change;
mod client;
mod load;
mod pgoutput;
mod reader;
mod setup;
mod source;
mod stream;
mod value;

pub use change::{change_event_id, lsn_text, HEADER_WAL_LSN, WAL_CHANGE_NAMESPACE};
pub use setup::{create_slot, slot_status, SlotStatus};
pub use source::{LoadProgress, Streamed, WalClaim, WalSource};

use std::time::Duration;

use crate::PgError;

/// One table whose changes are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureTable {
    /// `schema.table`, or `table` in `public`.
    pub table: String,
    /// Topic of its changes. Default: [`WalConfig::topic_template`].
    pub topic: Option<String>,
    /// Columns whose values make the event's key. Default: the table's
    /// replica identity (its primary key).
    pub key_columns: Vec<String>,
}

impl CaptureTable {
    /// A table captured with the default topic and key.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            topic: None,
            key_columns: Vec::new(),
        }
    }

    /// Its changes go to `topic`.
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Its events are keyed by these columns.
    pub fn with_key_columns(mut self, columns: &[&str]) -> Self {
        self.key_columns = columns.iter().map(|c| c.to_string()).collect();
        self
    }

    /// `schema.table`, with `public` filled in.
    pub(crate) fn qualified(&self) -> String {
        qualified(&self.table)
    }
}

/// `schema.table`, with `public` filled in.
pub(crate) fn qualified(table: &str) -> String {
    if table.contains('.') {
        table.to_string()
    } else {
        format!("public.{table}")
    }
}

/// Settings of a [`WalSource`].
///
/// ```
/// use outbox_pg::wal::{CaptureTable, WalConfig};
///
/// let config = WalConfig {
///     tables: vec![CaptureTable::new("user_logins").with_topic("user_events").with_key_columns(&["username"])],
///     ..WalConfig::default()
/// };
/// assert_eq!(config.slot, "outbox_wal");
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Replication slot (created, with the `pgoutput` plugin, when missing
    /// and [`WalConfig::create`] allows). Default: `outbox_wal`.
    pub slot: String,
    /// Publication naming the captured tables. Default: `outbox_wal`.
    pub publication: String,
    /// Tables whose changes are captured. Empty: only the events of
    /// [`Outbox::emit`](crate::Outbox::emit). Default: empty.
    pub tables: Vec<CaptureTable>,
    /// Outbox tables (as `Outbox::enqueue` writes them) read from the WAL
    /// instead of claimed: each inserted row is published as the event it
    /// holds (its id, topic, key, payload and headers); updates and deletes
    /// of it are not events. Retire the rows in the writer's transaction
    /// with `Outbox::enqueue_and_delete` (nothing stays in the table), or
    /// delete them later by `created_at`. Default: none.
    pub outbox_tables: Vec<String>,
    /// Topic of a captured table without its own, with `{schema}` and
    /// `{table}` replaced. Default: `{schema}.{table}`.
    pub topic_template: String,
    /// Prefix of the logical messages that carry events. Default:
    /// [`DEFAULT_MESSAGE_PREFIX`](crate::DEFAULT_MESSAGE_PREFIX).
    pub message_prefix: String,
    /// Publish the rows the captured tables hold (`op` `r`) when their slot
    /// is created: read beside the stream, in key order, in chunks between
    /// watermarks the stream carries, so each key's events follow its
    /// history while writes run. A load cut short goes on after the last
    /// chunk whose rows were acknowledged; rows read again that did not
    /// change keep their ids. Needs each table's primary key (or replica
    /// identity index). See `docs/wal.md`. Default: true.
    pub initial_load: bool,
    /// Rows per chunk of the initial load: what one snapshot reads, and
    /// what a cut load reads again at most. Default: 1,000.
    pub load_batch: usize,
    /// Create the slot, the publication and the progress table when
    /// missing (and add missing tables to the publication). Without it a
    /// missing one is a permanent error naming what to create. Default: true.
    pub create: bool,
    /// Most events decoded ahead of the relay: bounds memory while the
    /// broker is slow. Default: 20,000.
    pub read_ahead: usize,
    /// Longest time between two standby status updates (the server's view
    /// of what is confirmed); also how often an idle stream confirms the
    /// server's position, so an idle capture pins no WAL. Default: 1 s.
    pub status_interval: Duration,
    /// How long a relay that finds the slot held by another waits before
    /// trying again: with the server's `wal_sender_timeout`, this bounds a
    /// takeover. Default: 1 s.
    pub standby_retry: Duration,
    /// Table keeping, per slot, the last position this pipeline confirmed:
    /// how a slot dropped, lost or created again is told from a slot that
    /// is simply ahead. Default: `outbox_wal_progress`.
    pub progress_table: String,
    /// Ask the server (PostgreSQL 14 and later) to stream a transaction
    /// while it runs once it outgrows the walsender's
    /// `logical_decoding_work_mem` (pgoutput protocol 2), instead of
    /// spilling it to the server's disk and decoding it after its commit.
    /// Its events are still published at its commit, whole, in commit
    /// order; they reach the broker sooner after a large commit. Default: true.
    pub stream_in_progress: bool,
    /// The walsender's `logical_decoding_work_mem` for this relay's
    /// session, in kB (64 at least): a transaction larger than this is
    /// streamed while it runs (see `stream_in_progress`). `None`: the
    /// server's setting (64 MB unless changed). Default: `None`.
    pub decoding_work_mem_kb: Option<u32>,
    /// Bytes of streamed, uncommitted transactions the relay holds in
    /// memory; past it, the largest continues in a file of `spill_dir`.
    /// Default: 64 MiB.
    pub in_progress_memory: usize,
    /// Where a large uncommitted transaction spills: files without names,
    /// gone when the relay ends however it ends. `None`: the system's
    /// temporary directory. Default: `None`.
    pub spill_dir: Option<std::path::PathBuf>,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            slot: "outbox_wal".into(),
            publication: "outbox_wal".into(),
            tables: Vec::new(),
            outbox_tables: Vec::new(),
            topic_template: "{schema}.{table}".into(),
            message_prefix: crate::DEFAULT_MESSAGE_PREFIX.into(),
            initial_load: true,
            load_batch: 1000,
            create: true,
            read_ahead: 20_000,
            status_interval: Duration::from_secs(1),
            standby_retry: Duration::from_secs(1),
            progress_table: "outbox_wal_progress".into(),
            stream_in_progress: true,
            decoding_work_mem_kb: None,
            in_progress_memory: 64 << 20,
            spill_dir: None,
        }
    }
}

impl WalConfig {
    /// Checks names and limits before anything connects.
    pub fn validate(&self) -> Result<(), PgError> {
        for (what, name) in [("slot", &self.slot), ("publication", &self.publication)] {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(PgError::Config(format!(
                    "the {what} name {name:?} must be 1 to 63 of a-z, 0-9 and _"
                )));
            }
        }
        crate::SqlName::parse(&self.progress_table)?;
        for table in &self.tables {
            crate::SqlName::parse(&table.table)?;
        }
        for table in &self.outbox_tables {
            crate::SqlName::parse(table)?;
        }
        if self.load_batch == 0 {
            return Err(PgError::Config("load_batch must be at least 1".into()));
        }
        if self.read_ahead == 0 {
            return Err(PgError::Config("read_ahead must be at least 1".into()));
        }
        if self.decoding_work_mem_kb.is_some_and(|kb| kb < 64) {
            return Err(PgError::Config(
                "decoding_work_mem_kb must be at least 64 (the server's minimum)".into(),
            ));
        }
        if self.message_prefix.is_empty() {
            return Err(PgError::Config("message_prefix must not be empty".into()));
        }
        if self.message_prefix == backfill::LOAD_PREFIX {
            return Err(PgError::Config(format!(
                "message_prefix {:?} is the initial load's own: choose another",
                backfill::LOAD_PREFIX
            )));
        }
        Ok(())
    }
}
