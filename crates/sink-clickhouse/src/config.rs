//! Where the sink writes.

use std::time::Duration;

use crate::SinkError;

/// How to reach ClickHouse and which tables to write. Defaults are the
/// demo's: `user`/`strongpassword` at `http://127.0.0.1:8123`, database
/// `default`, table `user_logins`.
///
/// ```
/// let config = sink_clickhouse::ClickHouseConfig::default();
/// assert_eq!(config.table, "user_logins");
/// config.validate().unwrap();
/// ```
#[derive(Clone)]
pub struct ClickHouseConfig {
    /// HTTP(S) endpoint. Default: `http://127.0.0.1:8123`.
    pub url: String,
    /// User. Default: `user`.
    pub user: String,
    /// Password. Default: `strongpassword`. Never printed.
    pub password: String,
    /// Database. Default: `default`.
    pub database: String,
    /// Table the rows go to. Default: `user_logins`.
    pub table: String,
    /// Table records that can never be written go to, with their reason.
    /// Default: `outbox_dead_letter`.
    pub dead_letter_table: String,
    /// Create the database and both tables if missing. Default: true.
    pub create_tables: bool,
    /// Longest time one INSERT may take. Default: 60 s.
    pub insert_timeout: Duration,
    /// How many of the latest event ids of each partition the sink
    /// remembers to recognise an event the relay published twice (it was
    /// killed after the broker's acknowledgement, before its commit). The
    /// copy lands in the same partition, behind whatever else was published
    /// meanwhile; a copy farther behind than this is not recognised. Size it
    /// above the events per second of one partition times the relay's claim
    /// timeout plus the longest a relay may stall. 0 turns the check off.
    /// Costs about 40 bytes per id. Default: 100 000.
    pub dedup_window: usize,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            user: "user".into(),
            password: "strongpassword".into(),
            database: "default".into(),
            table: "user_logins".into(),
            dead_letter_table: "outbox_dead_letter".into(),
            create_tables: true,
            insert_timeout: Duration::from_secs(60),
            dedup_window: 100_000,
        }
    }
}

impl std::fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .field("table", &self.table)
            .field("dead_letter_table", &self.dead_letter_table)
            .finish()
    }
}

impl ClickHouseConfig {
    /// Checks names and the URL.
    pub fn validate(&self) -> Result<(), SinkError> {
        for (field, value) in [
            ("database", &self.database),
            ("table", &self.table),
            ("dead_letter_table", &self.dead_letter_table),
        ] {
            validate_identifier(field, value)?;
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(SinkError::Config(format!(
                "url {:?} must start with http:// or https://",
                self.url
            )));
        }
        Ok(())
    }
}

/// Accepts `[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes: names are then safe
/// to place in SQL between backquotes.
pub fn validate_identifier(field: &str, value: &str) -> Result<(), SinkError> {
    let valid = !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(SinkError::InvalidIdentifier {
            field: field.to_string(),
            value: value.to_string(),
        })
    }
}
