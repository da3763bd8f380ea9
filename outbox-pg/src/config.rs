//! Configuration of the outbox tables and sources.

use std::time::Duration;

use crate::{PgError, SqlIdent, SqlName};

/// Names and limits of the outbox tables.
///
/// ```
/// let config = outbox_pg::OutboxConfig::default();
/// assert_eq!(config.table, "outbox");
/// let valid = config.validate()?; // what the constructors take
/// let outbox = outbox_pg::Outbox::new(&valid);
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
    /// Checks every name and limit once, into the form the constructors
    /// ([`crate::PgOutboxSource::new`], [`crate::Outbox::new`],
    /// [`crate::OutboxAdmin::new`], [`crate::schema_sql`]) accept, so none
    /// of them parses the names again or can fail on them.
    pub fn validate(&self) -> Result<ValidOutboxConfig, PgError> {
        let table = SqlName::parse(&self.table)?;
        let dead_letter_table = SqlName::parse(&self.dead_letter_table)?;
        // The names the schema derives must fit PostgreSQL's limit too.
        let derived = DerivedNames {
            event_id_key: table.with_suffix("_event_id_key")?,
            lane_index: table.with_suffix("_lane_seq_idx")?,
            version_table: table.with_suffix("_schema_version")?,
            dead_letter_event_index: dead_letter_table.with_suffix("_event_id_idx")?,
        };
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
        Ok(ValidOutboxConfig {
            config: self.clone(),
            table,
            dead_letter_table,
            derived,
        })
    }
}

/// The names [`crate::schema_sql`] derives from the tables' names.
#[derive(Debug, Clone)]
pub(crate) struct DerivedNames {
    pub(crate) event_id_key: SqlName,
    pub(crate) lane_index: SqlName,
    pub(crate) version_table: SqlName,
    pub(crate) dead_letter_event_index: SqlName,
}

/// An [`OutboxConfig`] whose names and limits were checked, with the names
/// parsed: made by [`OutboxConfig::validate`] (or `try_into`), read like the
/// config it came from.
///
/// ```
/// let config = outbox_pg::OutboxConfig { table: "app.outbox".into(), ..Default::default() };
/// let valid = config.validate()?;
/// assert_eq!(valid.lanes, 64);
/// let schema = outbox_pg::schema_sql(&valid);
/// assert!(schema.contains(r#""app"."outbox""#));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct ValidOutboxConfig {
    config: OutboxConfig,
    table: SqlName,
    dead_letter_table: SqlName,
    pub(crate) derived: DerivedNames,
}

impl ValidOutboxConfig {
    /// The outbox table.
    pub fn table(&self) -> &SqlName {
        &self.table
    }

    /// The dead-letter table.
    pub fn dead_letter_table(&self) -> &SqlName {
        &self.dead_letter_table
    }
}

impl std::ops::Deref for ValidOutboxConfig {
    type Target = OutboxConfig;

    fn deref(&self) -> &OutboxConfig {
        &self.config
    }
}

impl TryFrom<OutboxConfig> for ValidOutboxConfig {
    type Error = PgError;

    fn try_from(config: OutboxConfig) -> Result<Self, PgError> {
        config.validate()
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
    /// Timestamp column that says when a row was written, for the backlog's
    /// oldest age ([`crate::BacklogProbe`]); `None`: the age is not known.
    /// Default: `event_time`.
    pub time_column: Option<String>,
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
            time_column: Some("event_time".into()),
            topic: "user_events".into(),
            dead_letter_table: "outbox_dead_letter".into(),
            claim_timeout: Duration::from_secs(20),
        }
    }
}

impl FlagTableConfig {
    /// Checks every name and limit once, into the form
    /// [`crate::FlagTableSource::new`] accepts.
    pub fn validate(&self) -> Result<ValidFlagTableConfig, PgError> {
        let table = SqlName::parse(&self.table)?;
        let dead_letter_table = SqlName::parse(&self.dead_letter_table)?;
        let id_column = SqlIdent::parse(&self.id_column)?;
        let flag_column = SqlIdent::parse(&self.flag_column)?;
        let key_column = self
            .key_column
            .as_deref()
            .map(SqlIdent::parse)
            .transpose()?;
        let time_column = self
            .time_column
            .as_deref()
            .map(SqlIdent::parse)
            .transpose()?;
        if self.topic.is_empty() {
            return Err(PgError::Config("topic must not be empty".into()));
        }
        if self.claim_timeout < Duration::from_secs(1) {
            return Err(PgError::Config("claim_timeout must be at least 1 s".into()));
        }
        Ok(ValidFlagTableConfig {
            config: self.clone(),
            table_sql: table,
            dead_letter_sql: dead_letter_table,
            id_sql: id_column,
            flag_sql: flag_column,
            key_sql: key_column,
            time_sql: time_column,
        })
    }
}

/// A [`FlagTableConfig`] whose names and limits were checked, with the
/// names parsed: made by [`FlagTableConfig::validate`] (or `try_into`).
#[derive(Debug, Clone)]
pub struct ValidFlagTableConfig {
    config: FlagTableConfig,
    pub(crate) table_sql: SqlName,
    pub(crate) dead_letter_sql: SqlName,
    pub(crate) id_sql: SqlIdent,
    pub(crate) flag_sql: SqlIdent,
    pub(crate) key_sql: Option<SqlIdent>,
    pub(crate) time_sql: Option<SqlIdent>,
}

impl std::ops::Deref for ValidFlagTableConfig {
    type Target = FlagTableConfig;

    fn deref(&self) -> &FlagTableConfig {
        &self.config
    }
}

impl TryFrom<FlagTableConfig> for ValidFlagTableConfig {
    type Error = PgError;

    fn try_from(config: FlagTableConfig) -> Result<Self, PgError> {
        config.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_names_and_limits_are_checked() {
        assert!(
            OutboxConfig::default().validate().is_ok(),
            "the defaults hold"
        );
        for bad in [
            OutboxConfig {
                table: "a;b".into(),
                ..Default::default()
            },
            OutboxConfig {
                dead_letter_table: "".into(),
                ..Default::default()
            },
            // Valid alone, but "<name>_schema_version" passes 63 bytes.
            OutboxConfig {
                table: "t".repeat(60),
                ..Default::default()
            },
            OutboxConfig {
                dead_letter_table: "d".repeat(55),
                ..Default::default()
            },
            OutboxConfig {
                claim_timeout: Duration::from_millis(999),
                ..Default::default()
            },
            OutboxConfig {
                lanes: 0,
                ..Default::default()
            },
            OutboxConfig {
                lanes: 4097,
                ..Default::default()
            },
            OutboxConfig {
                lanes_per_claim: 0,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn flag_table_names_and_limits_are_checked() -> Result<(), PgError> {
        let valid = FlagTableConfig::default().validate()?;
        assert_eq!(valid.flag_sql.as_str(), "sent_to_kafka");
        assert_eq!(
            valid.key_sql.as_ref().map(SqlIdent::as_str),
            Some("username")
        );
        for bad in [
            FlagTableConfig {
                table: "x.y.z".into(),
                ..Default::default()
            },
            FlagTableConfig {
                id_column: "id; --".into(),
                ..Default::default()
            },
            FlagTableConfig {
                flag_column: "".into(),
                ..Default::default()
            },
            FlagTableConfig {
                key_column: Some("a b".into()),
                ..Default::default()
            },
            FlagTableConfig {
                topic: "".into(),
                ..Default::default()
            },
            FlagTableConfig {
                claim_timeout: Duration::ZERO,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
        Ok(())
    }
}
