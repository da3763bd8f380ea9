//! Configuration of the outbox tables and sources.

use std::time::Duration;

use crate::{PgError, SqlIdent, SqlName};

/// Names and limits of the outbox tables.
///
/// ```
/// let config = outbox_pg::OutboxConfig::default();
/// assert_eq!(config.table, "outbox");
/// config.validate()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Outbox table, optionally `schema.table`. Default: `outbox`.
    pub table: String,
    /// Dead-letter table. Default: `outbox_dead_letter`.
    pub dead_letter_table: String,
    /// How long a claim may hold its transaction open while the broker
    /// answers. Postgres ends a session idle in its transaction for longer
    /// (`idle_in_transaction_session_timeout`), releasing the claim of a
    /// relay that hung or was stopped: this bounds how long a stalled relay
    /// keeps its lanes. Keep it above the bus's delivery timeout. Default: 20 s.
    pub claim_timeout: Duration,
    /// Number of lanes events are spread over by key (by event id when there
    /// is no key). Fixed when the table is created: changing it later needs
    /// an empty outbox. Default: 64.
    pub lanes: u16,
    /// Most lanes one claim takes while the outbox has a backlog. Several
    /// relays work in parallel on different lanes; one lane is only ever
    /// worked by one claim, which is what keeps per-key order. Once a claim
    /// comes back with fewer events than asked for (the relay has caught
    /// up), the next claim takes every lane with pending events, so at low
    /// load an event never waits for other lanes' turns; the first full
    /// claim narrows it again. Default: 8.
    pub lanes_per_claim: u16,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            table: "outbox".into(),
            dead_letter_table: "outbox_dead_letter".into(),
            claim_timeout: Duration::from_secs(20),
            lanes: 64,
            lanes_per_claim: 8,
        }
    }
}

impl OutboxConfig {
    /// Checks every name and limit.
    pub fn validate(&self) -> Result<(), PgError> {
        self.table()?;
        self.dead_letter_table()?;
        if self.claim_timeout < Duration::from_secs(1) {
            return Err(PgError::Config("claim_timeout must be at least 1 s".into()));
        }
        if !(1..=4096).contains(&self.lanes) {
            return Err(PgError::Config(format!(
                "lanes must be between 1 and 4096, not {}",
                self.lanes
            )));
        }
        if self.lanes_per_claim == 0 {
            return Err(PgError::Config("lanes_per_claim must be at least 1".into()));
        }
        Ok(())
    }

    pub(crate) fn table(&self) -> Result<SqlName, PgError> {
        SqlName::parse(&self.table)
    }

    pub(crate) fn dead_letter_table(&self) -> Result<SqlName, PgError> {
        SqlName::parse(&self.dead_letter_table)
    }
}

/// A business table with an "already sent" flag, read by [`crate::FlagTableSource`].
///
/// The default is the original demo: rows of `user_logins` with
/// `sent_to_kafka = false`, published to `user_events` keyed by `username`.
///
/// ```
/// let config = outbox_pg::FlagTableConfig::default();
/// assert_eq!(config.flag_column, "sent_to_kafka");
/// config.validate()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct FlagTableConfig {
    /// The table. Default: `user_logins`.
    pub table: String,
    /// Integer primary key, also the publishing order. Default: `id`.
    pub id_column: String,
    /// Boolean column set to true once the broker acknowledged the row. Default: `sent_to_kafka`.
    pub flag_column: String,
    /// Column whose text value is the message key; `None` for no key. Default: `username`.
    pub key_column: Option<String>,
    /// Destination topic. Default: `user_events`.
    pub topic: String,
    /// Where rows the broker can never take are recorded. Default: `outbox_dead_letter`.
    pub dead_letter_table: String,
    /// See [`OutboxConfig::claim_timeout`]. Default: 20 s.
    pub claim_timeout: Duration,
}

impl Default for FlagTableConfig {
    fn default() -> Self {
        Self {
            table: "user_logins".into(),
            id_column: "id".into(),
            flag_column: "sent_to_kafka".into(),
            key_column: Some("username".into()),
            topic: "user_events".into(),
            dead_letter_table: "outbox_dead_letter".into(),
            claim_timeout: Duration::from_secs(20),
        }
    }
}

impl FlagTableConfig {
    /// Checks every name and limit.
    pub fn validate(&self) -> Result<(), PgError> {
        SqlName::parse(&self.table)?;
        SqlName::parse(&self.dead_letter_table)?;
        SqlIdent::parse(&self.id_column)?;
        SqlIdent::parse(&self.flag_column)?;
        if let Some(key) = &self.key_column {
            SqlIdent::parse(key)?;
        }
        if self.topic.is_empty() {
            return Err(PgError::Config("topic must not be empty".into()));
        }
        if self.claim_timeout < Duration::from_secs(1) {
            return Err(PgError::Config("claim_timeout must be at least 1 s".into()));
        }
        Ok(())
    }
}
