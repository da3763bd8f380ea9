//! Per-service command-line options; each default comes from the library's
//! configuration struct.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use clap::builder::TypedValueParser as _;
use clap::Args;
use outbox_kafka::KafkaConfig;
use outbox_pg::{OutboxConfig, PgConfig};
use sink_clickhouse::{ClickHouseConfig, ClusterConfig};

use crate::millis;

/// PostgreSQL connection options (`Debug` redacts the password).
#[derive(Clone, Args)]
pub struct PgArgs {
    /// PostgreSQL host.
    #[arg(long, env = "OUTBOX_PG_HOST", default_value_t = PgConfig::default().host)]
    pub pg_host: String,
    /// PostgreSQL port.
    #[arg(long, env = "OUTBOX_PG_PORT", default_value_t = PgConfig::default().port)]
    pub pg_port: u16,
    /// PostgreSQL user.
    #[arg(long, env = "OUTBOX_PG_USER", default_value_t = PgConfig::default().user)]
    pub pg_user: String,
    /// PostgreSQL password (prefer the environment variable).
    #[arg(
        long,
        env = "OUTBOX_PG_PASSWORD",
        default_value_t = PgConfig::default().password,
        hide_default_value = true,
        hide_env_values = true
    )]
    pub pg_password: String,
    /// File holding the PostgreSQL password (wins over --pg-password; for
    /// secrets mounted as files).
    #[arg(long, env = "OUTBOX_PG_PASSWORD_FILE", value_name = "FILE")]
    pub pg_password_file: Option<PathBuf>,
    /// PostgreSQL database.
    #[arg(long, env = "OUTBOX_PG_DATABASE", default_value_t = PgConfig::default().dbname)]
    pub pg_database: String,
    /// TLS to PostgreSQL, as libpq's sslmode: only verify-full checks that
    /// the server is who it claims to be.
    #[arg(
        long,
        env = "OUTBOX_PG_SSLMODE",
        default_value_t = PgConfig::default().ssl_mode,
        value_parser = clap::builder::PossibleValuesParser::new(
            ["disable", "prefer", "require", "verify-ca", "verify-full"]
        ).map(|mode| mode.parse::<outbox_pg::SslMode>().unwrap_or_default())
    )]
    pub pg_sslmode: outbox_pg::SslMode,
    /// PEM file of the CA certificates that sign PostgreSQL's certificate
    /// (libpq's sslrootcert): only they are trusted; the system's CAs when unset.
    #[arg(long, env = "OUTBOX_PG_SSLROOTCERT", value_name = "FILE")]
    pub pg_sslrootcert: Option<PathBuf>,
}

impl PgArgs {
    /// The adapter's configuration; fails when the password file cannot be read.
    pub fn config(&self, application_name: &str) -> anyhow::Result<outbox_pg::PgConfig> {
        Ok(outbox_pg::PgConfig {
            host: self.pg_host.clone(),
            port: self.pg_port,
            user: self.pg_user.clone(),
            password: secret(&self.pg_password, self.pg_password_file.as_deref())?,
            dbname: self.pg_database.clone(),
            application_name: application_name.into(),
            ssl_mode: self.pg_sslmode,
            ssl_root_cert: self.pg_sslrootcert.clone(),
            ..outbox_pg::PgConfig::default()
        })
    }
}

/// `value`, or the content of `file` (without its final newline) when given.
/// The error names the file, never the secret.
pub fn secret(value: &str, file: Option<&Path>) -> anyhow::Result<String> {
    let Some(file) = file else {
        return Ok(value.to_string());
    };
    let text = std::fs::read_to_string(file)
        .map_err(|err| anyhow::anyhow!("cannot read the secret file {}: {err}", file.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// Kafka connection options (`Debug` redacts `--kafka-properties` values).
#[derive(Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "OUTBOX_KAFKA_BROKERS", default_value_t = KafkaConfig::default().brokers)]
    pub kafka_brokers: String,
    /// Partitions of topics created by this program.
    #[arg(long, env = "OUTBOX_TOPIC_PARTITIONS", default_value_t = KafkaConfig::default().topic_partitions)]
    pub topic_partitions: i32,
    /// How long the producer tries to deliver a message before reporting failure (ms).
    #[arg(
        long,
        env = "OUTBOX_KAFKA_MESSAGE_TIMEOUT_MS",
        default_value_t = millis(KafkaConfig::default().message_timeout)
    )]
    pub kafka_message_timeout_ms: u64,
    /// How long the producer waits to fill a request (`linger.ms`): more
    /// is bigger requests, less is lower latency.
    #[arg(long, env = "OUTBOX_KAFKA_LINGER_MS", default_value_t = millis(KafkaConfig::default().linger))]
    pub kafka_linger_ms: u64,
    /// `linger.ms` of the producer of small batches (at most
    /// --kafka-small-batch-events): it only has to outlast handing the
    /// batch over; longer is an event's wait for nothing.
    #[arg(
        long,
        env = "OUTBOX_KAFKA_SMALL_BATCH_LINGER_MS",
        default_value_t = millis(KafkaConfig::default().small_batch_linger)
    )]
    pub kafka_small_batch_linger_ms: u64,
    /// Batches of at most this many events go through the small-batch
    /// producer (when it is free); 0: none, every batch waits
    /// --kafka-linger-ms.
    #[arg(
        long,
        env = "OUTBOX_KAFKA_SMALL_BATCH_EVENTS",
        default_value_t = KafkaConfig::default().small_batch_events
    )]
    pub kafka_small_batch_events: usize,
    /// Use the idempotent producer. `false` for brokers that cannot take its
    /// epoch bump after a timeout (tansu 0.6); the guarantees hold either way.
    #[arg(
        long,
        env = "OUTBOX_KAFKA_IDEMPOTENCE",
        default_value_t = KafkaConfig::default().idempotence,
        action = clap::ArgAction::Set
    )]
    pub kafka_idempotence: bool,
    /// Compression of the batches the producer sends: none, lz4, zstd, gzip
    /// or snappy. On tansu, none is fastest and lightest; on Apache Kafka
    /// over a slow network lz4 or zstd usually pays.
    #[arg(long, env = "OUTBOX_KAFKA_COMPRESSION", default_value_t = KafkaConfig::default().compression)]
    pub kafka_compression: outbox_kafka::Compression,
    /// Further librdkafka properties, `key=value` separated by commas
    /// (`security.protocol=SASL_PLAINTEXT,sasl.mechanism=PLAIN,…`). Values
    /// are never printed.
    #[arg(
        long,
        env = "OUTBOX_KAFKA_PROPERTIES",
        value_name = "KEY=VALUE,…",
        hide_env_values = true
    )]
    pub kafka_properties: Option<String>,
}

impl KafkaArgs {
    /// The adapter's configuration; fails on a malformed
    /// `--kafka-properties` entry, naming its position, never its text (it
    /// may hold a password).
    pub fn config(&self, client_id: &str) -> anyhow::Result<outbox_kafka::KafkaConfig> {
        let mut extra = std::collections::BTreeMap::new();
        let text = self.kafka_properties.as_deref().unwrap_or_default();
        for (index, pair) in text.split(',').enumerate() {
            if pair.trim().is_empty() {
                continue;
            }
            match pair.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => {
                    extra.insert(key.trim().to_string(), value.trim().to_string());
                }
                _ => anyhow::bail!(
                    "--kafka-properties: entry {} is not key=value (entries are separated by commas)",
                    index + 1
                ),
            }
        }
        Ok(outbox_kafka::KafkaConfig {
            extra,
            brokers: self.kafka_brokers.clone(),
            client_id: client_id.into(),
            topic_partitions: self.topic_partitions,
            message_timeout: Duration::from_millis(self.kafka_message_timeout_ms),
            linger: Duration::from_millis(self.kafka_linger_ms),
            small_batch_linger: Duration::from_millis(self.kafka_small_batch_linger_ms),
            small_batch_events: self.kafka_small_batch_events,
            idempotence: self.kafka_idempotence,
            compression: self.kafka_compression,
            ..outbox_kafka::KafkaConfig::default()
        })
    }
}

/// ClickHouse connection options (`Debug` redacts the password).
#[derive(Clone, Args)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP endpoint.
    #[arg(
        long,
        env = "OUTBOX_CLICKHOUSE_URL",
        default_value_t = ClickHouseConfig::default().url
    )]
    pub clickhouse_url: String,
    /// PEM file of the CA certificates to trust for an https:// ClickHouse
    /// URL, instead of the system's.
    #[arg(long, env = "OUTBOX_CLICKHOUSE_CA_FILE", value_name = "FILE")]
    pub clickhouse_ca_file: Option<PathBuf>,
    /// ClickHouse user.
    #[arg(long, env = "OUTBOX_CLICKHOUSE_USER", default_value_t = ClickHouseConfig::default().user)]
    pub clickhouse_user: String,
    /// ClickHouse password (prefer the environment variable).
    #[arg(
        long,
        env = "OUTBOX_CLICKHOUSE_PASSWORD",
        default_value_t = ClickHouseConfig::default().password,
        hide_default_value = true,
        hide_env_values = true
    )]
    pub clickhouse_password: String,
    /// File holding the ClickHouse password (wins over --clickhouse-password).
    #[arg(long, env = "OUTBOX_CLICKHOUSE_PASSWORD_FILE", value_name = "FILE")]
    pub clickhouse_password_file: Option<PathBuf>,
    /// ClickHouse database.
    #[arg(long, env = "OUTBOX_CLICKHOUSE_DATABASE", default_value_t = ClickHouseConfig::default().database)]
    pub clickhouse_database: String,
    /// ClickHouse table the rows go to.
    #[arg(long, env = "OUTBOX_CLICKHOUSE_TABLE", default_value_t = ClickHouseConfig::default().table)]
    pub clickhouse_table: String,
    /// Latest event ids remembered per partition at least, to skip events
    /// the relay published twice (the window grows to cover the horizon).
    #[arg(long, env = "OUTBOX_DEDUP_WINDOW", default_value_t = ClickHouseConfig::default().dedup_window)]
    pub dedup_window: usize,
    /// How long after its original a republished copy may come, by record
    /// timestamps (s): above the relays' claim timeout plus message timeout.
    #[arg(long, env = "OUTBOX_DEDUP_HORIZON_SECS", default_value_t = ClickHouseConfig::default().dedup_horizon.as_secs())]
    pub dedup_horizon_secs: u64,
    /// The most ids one partition's dedup window may grow to.
    #[arg(long, env = "OUTBOX_DEDUP_WINDOW_MAX", default_value_t = ClickHouseConfig::default().dedup_window_max)]
    pub dedup_window_max: usize,
    /// ClickHouse table for records that can never be written.
    #[arg(
        long,
        env = "OUTBOX_CLICKHOUSE_DEAD_LETTER_TABLE",
        default_value_t = ClickHouseConfig::default().dead_letter_table
    )]
    pub clickhouse_dead_letter_table: String,
    /// Write to this ClickHouse cluster (a name of the servers'
    /// remote_servers): both tables become Distributed tables, sharded by
    /// Kafka partition, over local tables on every shard.
    #[arg(long, env = "OUTBOX_CLICKHOUSE_CLUSTER", value_name = "NAME")]
    pub clickhouse_cluster: Option<String>,
    /// With --clickhouse-cluster: create the tables ON CLUSTER (needs
    /// ClickHouse Keeper or ZooKeeper); false: create them on each shard yourself.
    #[arg(
        long,
        env = "OUTBOX_CLICKHOUSE_ON_CLUSTER",
        default_value_t = ClusterConfig::new("").on_cluster,
        action = clap::ArgAction::Set
    )]
    pub clickhouse_on_cluster: bool,
    /// With --clickhouse-cluster: Replicated local tables (needs Keeper and
    /// the {shard}/{replica} macros).
    #[arg(
        long,
        env = "OUTBOX_CLICKHOUSE_REPLICATED",
        default_value_t = ClusterConfig::new("").replicated,
        action = clap::ArgAction::Set
    )]
    pub clickhouse_replicated: bool,
    /// With replicas: insert_quorum of every insert (and sequentially
    /// consistent lookups); absent: the replicas per shard, from the
    /// cluster's definition. 0 or 1: off.
    #[arg(long, env = "OUTBOX_CLICKHOUSE_INSERT_QUORUM")]
    pub clickhouse_insert_quorum: Option<u32>,
    /// Give each insert an insert_deduplication_token of exactly its rows
    /// (servers 22.2 and later): the same rows sent again are dropped by a
    /// deduplicating table. Off: a table emptied by hand and filled again
    /// from the same topic would lose rows (see ClickHouseConfig).
    #[arg(long, env = "OUTBOX_CLICKHOUSE_DEDUP_TOKEN")]
    pub clickhouse_dedup_token: bool,
}

impl ClickHouseArgs {
    /// The adapter's configuration, validated; fails when the password
    /// file cannot be read or a name or limit is invalid.
    pub fn config(&self) -> anyhow::Result<sink_clickhouse::ValidClickHouseConfig> {
        let config = sink_clickhouse::ClickHouseConfig {
            url: self.clickhouse_url.clone(),
            ca_file: self.clickhouse_ca_file.clone(),
            user: self.clickhouse_user.clone(),
            password: secret(
                &self.clickhouse_password,
                self.clickhouse_password_file.as_deref(),
            )?,
            database: self.clickhouse_database.clone(),
            table: self.clickhouse_table.clone(),
            dead_letter_table: self.clickhouse_dead_letter_table.clone(),
            dedup_window: self.dedup_window,
            dedup_horizon: Duration::from_secs(self.dedup_horizon_secs),
            dedup_window_max: self.dedup_window_max,
            insert_dedup_token: self.clickhouse_dedup_token,
            cluster: self
                .clickhouse_cluster
                .as_ref()
                .map(|name| sink_clickhouse::ClusterConfig {
                    on_cluster: self.clickhouse_on_cluster,
                    replicated: self.clickhouse_replicated,
                    insert_quorum: self.clickhouse_insert_quorum,
                    ..sink_clickhouse::ClusterConfig::new(name.clone())
                }),
            ..sink_clickhouse::ClickHouseConfig::default()
        };
        config
            .validate()
            .context("invalid clickhouse configuration")
    }
}

const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for PgArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgArgs")
            .field("pg_host", &self.pg_host)
            .field("pg_port", &self.pg_port)
            .field("pg_user", &self.pg_user)
            .field("pg_password", &REDACTED)
            .field("pg_password_file", &self.pg_password_file)
            .field("pg_database", &self.pg_database)
            .field("pg_sslmode", &self.pg_sslmode)
            .field("pg_sslrootcert", &self.pg_sslrootcert)
            .finish()
    }
}

impl std::fmt::Debug for KafkaArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let property_keys: Vec<&str> = self
            .kafka_properties
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.trim()))
            .collect();
        f.debug_struct("KafkaArgs")
            .field("kafka_brokers", &self.kafka_brokers)
            .field("topic_partitions", &self.topic_partitions)
            .field("kafka_message_timeout_ms", &self.kafka_message_timeout_ms)
            .field("kafka_linger_ms", &self.kafka_linger_ms)
            .field(
                "kafka_small_batch_linger_ms",
                &self.kafka_small_batch_linger_ms,
            )
            .field("kafka_small_batch_events", &self.kafka_small_batch_events)
            .field("kafka_compression", &self.kafka_compression)
            .field("kafka_idempotence", &self.kafka_idempotence)
            .field("kafka_property_keys", &property_keys)
            .finish()
    }
}

impl std::fmt::Debug for ClickHouseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseArgs")
            .field("clickhouse_url", &self.clickhouse_url)
            .field("clickhouse_ca_file", &self.clickhouse_ca_file)
            .field("clickhouse_user", &self.clickhouse_user)
            .field("clickhouse_password", &REDACTED)
            .field("clickhouse_password_file", &self.clickhouse_password_file)
            .field("clickhouse_database", &self.clickhouse_database)
            .field("clickhouse_table", &self.clickhouse_table)
            .field("dedup_window", &self.dedup_window)
            .field("dedup_horizon_secs", &self.dedup_horizon_secs)
            .field("dedup_window_max", &self.dedup_window_max)
            .field(
                "clickhouse_dead_letter_table",
                &self.clickhouse_dead_letter_table,
            )
            .field("clickhouse_cluster", &self.clickhouse_cluster)
            .field("clickhouse_on_cluster", &self.clickhouse_on_cluster)
            .field("clickhouse_replicated", &self.clickhouse_replicated)
            .field("clickhouse_insert_quorum", &self.clickhouse_insert_quorum)
            .finish()
    }
}

#[cfg(test)]
mod redaction_tests {
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        pg: super::PgArgs,
        #[command(flatten)]
        kafka: super::KafkaArgs,
        #[command(flatten)]
        clickhouse: super::ClickHouseArgs,
    }

    #[test]
    fn debug_output_has_no_secret() {
        let cli = Cli::parse_from([
            "bin",
            "--pg-password",
            "pg-secret-1",
            "--clickhouse-password",
            "ch-secret-2",
            "--kafka-properties",
            "sasl.username=u,sasl.password=kafka-secret-3",
        ]);
        let text = format!("{cli:?}");
        for secret in ["pg-secret-1", "ch-secret-2", "kafka-secret-3"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("sasl.password"), "{text}");
    }
}

/// The outbox tables.
#[derive(Debug, Clone, Args)]
pub struct OutboxTableArgs {
    /// Outbox table (with --source outbox).
    #[arg(long, env = "OUTBOX_TABLE", default_value_t = OutboxConfig::default().table)]
    pub outbox_table: String,
    /// Dead-letter table for events the broker can never take.
    #[arg(
        long,
        env = "OUTBOX_DEAD_LETTER_TABLE",
        default_value_t = OutboxConfig::default().dead_letter_table
    )]
    pub dead_letter_table: String,
}

impl OutboxTableArgs {
    /// The adapter's configuration for these tables (other fields default).
    pub fn config(&self) -> outbox_pg::OutboxConfig {
        outbox_pg::OutboxConfig {
            table: self.outbox_table.clone(),
            dead_letter_table: self.dead_letter_table.clone(),
            ..outbox_pg::OutboxConfig::default()
        }
    }
}

/// The topic a consumer group reads.
#[derive(Debug, Clone, Args)]
pub struct GroupArgs {
    /// Topic to read (by default the one the demo's flag table goes to).
    #[arg(long, env = "OUTBOX_TOPIC", default_value_t = outbox_pg::FlagTableConfig::default().topic)]
    pub topic: String,
    /// Consumer group.
    #[arg(
        long,
        env = "OUTBOX_GROUP_ID",
        default_value = "user_events_clickhouse"
    )]
    pub group_id: String,
}
