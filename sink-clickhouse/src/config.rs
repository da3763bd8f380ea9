//! Where the sink writes.

use std::path::PathBuf;
use std::time::Duration;

use crate::SinkError;

/// How to reach ClickHouse and which tables to write. Defaults are the
/// demo's: `user`/`strongpassword` at `http://127.0.0.1:8123`, database
/// `default`, table `user_logins`.
///
/// ```
/// let config = sink_clickhouse::ClickHouseConfig::default();
/// assert_eq!(config.table, "user_logins");
/// config.validate()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ClickHouseConfig {
    /// HTTP(S) endpoint. Default: `http://127.0.0.1:8123`. With
    /// `https://` the server's certificate is always verified, against
    /// [`ClickHouseConfig::ca_file`] (the system's CAs when unset), for the
    /// URL's host.
    pub url: String,
    /// PEM file of the CA certificates to trust for an `https://` URL
    /// (a private CA), instead of the system's, as curl's `--cacert`: the
    /// server is pinned to these CAs. Default: none (the system's CAs).
    pub ca_file: Option<PathBuf>,
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
    /// remembers at least, to recognise an event a relay published twice (it
    /// died or stalled after the broker's acknowledgement, before its
    /// commit). The copy lands in the same partition, behind whatever else
    /// was published meanwhile. The window grows beyond this, up to
    /// [`ClickHouseConfig::dedup_window_max`], so that it always holds the
    /// ids published within [`ClickHouseConfig::dedup_horizon`] of the
    /// newest. 0 turns the check off. Its memory per id is measured in
    /// `docs/performance.md`. Default: 100 000.
    pub dedup_window: usize,
    /// How long after an original a copy may be published, by the record
    /// timestamps the producer set: must exceed the relays' claim timeout
    /// plus their producer's message timeout (GUARANTEES.md). Default: 120 s
    /// (the defaults are 20 s and 10 s).
    pub dedup_horizon: Duration,
    /// The most ids the window of one partition may grow to. When the
    /// horizon would need more, the oldest ids are forgotten anyway and
    /// counted (`outbox_sink_dedup_overruns_total`, and a warning).
    /// Default: 2 000 000 (about 60 MB per partition at the cap).
    pub dedup_window_max: usize,
    /// Give every insert an `insert_deduplication_token` naming exactly its
    /// rows (positions and event ids), on servers that have the setting
    /// (22.2 and later; ignored with a warning on others): should a lookup
    /// miss rows that were written, the same rows sent again are dropped by
    /// the server. Deduplication happens only where the table does it
    /// (`Replicated…MergeTree`, or `non_replicated_deduplication_window`).
    /// Off by default: a table emptied by hand (`TRUNCATE`) and filled
    /// again from the same topic would then drop, silently, every insert
    /// still in the server's deduplication window (1,000 inserts and a week
    /// on current replicated tables). Default: false.
    pub insert_dedup_token: bool,
    /// Write to a cluster: `table` and `dead_letter_table` become
    /// `Distributed` tables over local tables on every shard. Default: none
    /// (one server).
    pub cluster: Option<ClusterConfig>,
}

/// Tables on a ClickHouse cluster: a local table per shard (replicated if
/// `replicated`) and a `Distributed` table over them, sharded by Kafka
/// partition so each partition's rows and the sink's lookups stay on one
/// shard. Inserts wait for every shard (`insert_distributed_sync`).
///
/// ```
/// use sink_clickhouse::{ClickHouseConfig, ClusterConfig};
///
/// let config = ClickHouseConfig {
///     cluster: Some(ClusterConfig {
///         insert_quorum: Some(2), // two replicas per shard; None: found from the cluster
///         ..ClusterConfig::new("analytics")
///     }),
///     ..ClickHouseConfig::default()
/// };
/// config.validate()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The cluster's name in the servers' `remote_servers`.
    pub name: String,
    /// Run the DDL `ON CLUSTER` (distributed DDL, which needs ClickHouse
    /// Keeper or ZooKeeper); off, the tables must be created on every shard
    /// by other means. Default: true.
    pub on_cluster: bool,
    /// `Replicated…MergeTree` local tables, at
    /// `/clickhouse/tables/{shard}/<database>/<table>` with the servers'
    /// `{shard}` and `{replica}` macros. Default: true.
    pub replicated: bool,
    /// Suffix of the local tables' names. Default: `_local`.
    pub local_suffix: String,
    /// With replicas: `insert_quorum` for every insert, and sequentially
    /// consistent reads, so that a lookup never reads a replica lagging
    /// behind rows already written (it would write them again: the cluster
    /// tests show it). `None`: the replicas per shard, read from
    /// `system.clusters` at start (the fewest of any shard; a warning when
    /// shards differ, since one quorum applies to every shard). `Some(0)` or
    /// `Some(1)`: off. Default: `None`.
    pub insert_quorum: Option<u32>,
}

impl ClusterConfig {
    /// A replicated cluster named `name`, DDL `ON CLUSTER`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            on_cluster: true,
            replicated: true,
            local_suffix: "_local".into(),
            insert_quorum: None,
        }
    }
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            ca_file: None,
            user: "user".into(),
            password: "strongpassword".into(),
            database: "default".into(),
            table: "user_logins".into(),
            dead_letter_table: "outbox_dead_letter".into(),
            create_tables: true,
            insert_timeout: Duration::from_secs(60),
            dedup_window: 100_000,
            dedup_horizon: Duration::from_secs(120),
            dedup_window_max: 2_000_000,
            insert_dedup_token: false,
            cluster: None,
        }
    }
}

impl std::fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &self.url)
            .field("ca_file", &self.ca_file)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .field("table", &self.table)
            .field("dead_letter_table", &self.dead_letter_table)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl ClickHouseConfig {
    /// Checks names and the URL once, into the form
    /// [`crate::ClickHouseSink::new`] and [`crate::ClickHouseDeadLetters::new`]
    /// accept: names are placed in SQL only after this.
    pub fn validate(&self) -> Result<ValidClickHouseConfig, SinkError> {
        for (field, value) in [
            ("database", &self.database),
            ("table", &self.table),
            ("dead_letter_table", &self.dead_letter_table),
        ] {
            validate_identifier(field, value)?;
        }
        if let Some(cluster) = &self.cluster {
            validate_identifier("cluster", &cluster.name)?;
            if !cluster.local_suffix.is_empty() {
                validate_identifier(
                    "cluster local_suffix",
                    &format!("_{}", cluster.local_suffix),
                )?;
            } else {
                return Err(SinkError::Config(
                    "cluster local_suffix must not be empty: the local tables need names of their own".into(),
                ));
            }
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(SinkError::Config(format!(
                "url {:?} must start with http:// or https://",
                self.url
            )));
        }
        Ok(ValidClickHouseConfig(self.clone()))
    }
}

/// A [`ClickHouseConfig`] whose names and URL were checked: made by
/// [`ClickHouseConfig::validate`] (or `try_into`), read like the config it
/// came from.
///
/// ```
/// let valid = sink_clickhouse::ClickHouseConfig::default().validate()?;
/// assert_eq!(valid.table, "user_logins");
/// let dead = sink_clickhouse::ClickHouseDeadLetters::new(valid)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct ValidClickHouseConfig(ClickHouseConfig);

impl std::ops::Deref for ValidClickHouseConfig {
    type Target = ClickHouseConfig;

    fn deref(&self) -> &ClickHouseConfig {
        &self.0
    }
}

impl TryFrom<ClickHouseConfig> for ValidClickHouseConfig {
    type Error = SinkError;

    fn try_from(config: ClickHouseConfig) -> Result<Self, SinkError> {
        config.validate()
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
