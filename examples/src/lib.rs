//! Shared wiring of the example binaries: command-line options (each also
//! read from an environment variable and from an optional TOML file),
//! logging, signals, start-up checks, the `/metrics` endpoint and the demo's
//! ClickHouse row.

/// The code of the repository's README, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

mod config_file;
mod ops;

pub use config_file::{parse_cli, try_parse_from};
pub use ops::{Ops, OpsArgs};

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::Args;
use clickhouse::Row;
use outbox_core::Record;
use outbox_kafka::KafkaConfig;
use outbox_pg::{OutboxConfig, PgConfig};
use serde::{Deserialize, Serialize};
use sink_clickhouse::{ClickHouseConfig, ClusterConfig, RowMapper, RowMeta};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
        default_value = "prefer",
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
}

impl ClickHouseArgs {
    /// The adapter's configuration; fails when the password file cannot be read.
    pub fn config(&self) -> anyhow::Result<sink_clickhouse::ClickHouseConfig> {
        Ok(sink_clickhouse::ClickHouseConfig {
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
        })
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
    /// Topic to read.
    #[arg(long, env = "OUTBOX_TOPIC", default_value = "user_events")]
    pub topic: String,
    /// Consumer group.
    #[arg(
        long,
        env = "OUTBOX_GROUP_ID",
        default_value = "user_events_clickhouse"
    )]
    pub group_id: String,
}

/// Runs `task` every `interval` until `shutdown` (for gauges refreshed in
/// the background).
pub async fn every<F, Fut>(interval: Duration, shutdown: CancellationToken, mut task: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => task().await,
        }
    }
}

/// Options of every binary: configuration file, logging, start and stop.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// TOML file of options (keys are the flags' names: `batch_size = 500`);
    /// flags and environment variables win over it.
    #[arg(long, env = "OUTBOX_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "OUTBOX_LOG_JSON")]
    pub log_json: bool,
    /// How long to retry reaching a service at start before giving up (s).
    #[arg(long, env = "OUTBOX_STARTUP_TIMEOUT_SECS", default_value_t = 15)]
    pub startup_timeout_secs: u64,
    /// After SIGTERM/SIGINT, how long to let work in flight finish before
    /// exiting anyway (s). Abandoned work is not lost: it was not committed.
    #[arg(long, env = "OUTBOX_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
}

/// `duration` in whole milliseconds, for options given in ms (their
/// defaults come from the libraries' configuration structs).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Installs the tracing subscriber (`RUST_LOG` filters, default `info`).
pub fn init_tracing(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// One line for an error and its causes, leaving out causes whose text the
/// message already contains (adapter messages embed their cause's detail).
pub fn render_error(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        let first_line = part.lines().next().unwrap_or_default();
        if text.contains(first_line) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// The exit of a binary: 0 on success; otherwise the error, logged and
/// printed as one `error: …` line on stderr, and 1.
pub fn exit_with(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let message = render_error(&err);
            tracing::error!("{message}");
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The exit code of a process whose work in flight did not finish within
/// the drain timeout after SIGINT or SIGTERM (as `timeout(1)` uses it), so
/// a supervisor can tell a stuck stop from a clean one.
pub const EXIT_DRAIN_TIMED_OUT: i32 = 124;

/// The process's shutdown token and the tasks it waits for before exiting.
static BACKGROUND: std::sync::OnceLock<(tokio_util::task::TaskTracker, CancellationToken)> =
    std::sync::OnceLock::new();

fn background() -> &'static (tokio_util::task::TaskTracker, CancellationToken) {
    BACKGROUND.get_or_init(|| {
        (
            tokio_util::task::TaskTracker::new(),
            CancellationToken::new(),
        )
    })
}

/// Spawns a task that must end before the process exits (a lease session
/// to close cleanly, a gauge refresher, the /metrics server): it must end
/// once the token of [`shutdown_on_signals`] is cancelled. See [`finish`].
pub fn spawn_background<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    background().0.spawn(task);
}

/// [`spawn_background`] for a task the process cannot work without: when
/// it fails, the error is logged naming `what` and `shutdown` is cancelled,
/// so the process stops instead of running on without it.
pub fn spawn_critical<F, E>(what: &'static str, task: F, shutdown: CancellationToken)
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    spawn_background(async move {
        if let Err(err) = task.await {
            tracing::error!(error = %err, "{what} failed for good; stopping");
            shutdown.cancel();
        }
    });
}

/// Ends the process's work: cancels the shutdown token (the main loop ended
/// on its own, say after `--drain`), then waits up to `limit` for every task
/// of [`spawn_background`]. A task still running then is an error, so the
/// exit status tells.
pub async fn finish(result: anyhow::Result<()>, limit: Duration) -> anyhow::Result<()> {
    let (tasks, token) = background();
    token.cancel();
    tasks.close();
    let joined = tokio::time::timeout(limit, tasks.wait()).await.is_ok();
    match (result, joined) {
        (Err(err), _) => Err(err),
        (Ok(()), true) => Ok(()),
        (Ok(()), false) => anyhow::bail!(
            "background tasks did not stop within the drain timeout ({} s)",
            limit.as_secs()
        ),
    }
}

/// A token cancelled on SIGINT or SIGTERM (the process's one shutdown
/// token: [`finish`] cancels it too). If the process has not ended
/// `drain_timeout` after the signal (a batch stuck on a service that stopped
/// answering, a client library blocking on close), it exits with
/// [`EXIT_DRAIN_TIMED_OUT`] from a plain thread, which fires even if the
/// async runtime is blocked: work in flight was not committed, so it stays
/// pending or is read again.
pub fn shutdown_on_signals(drain_timeout: Duration) -> CancellationToken {
    let token = background().1.clone();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(err) => {
                        warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops cleanly");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        info!(
            drain_timeout_s = drain_timeout.as_secs(),
            "shutdown requested; finishing the batch in flight"
        );
        cancel.cancel();
        std::thread::spawn(move || {
            std::thread::sleep(drain_timeout);
            eprintln!(
                "error: work in flight did not finish within the drain timeout ({} s); exiting with code \
                 {EXIT_DRAIN_TIMED_OUT}, it stays uncommitted",
                drain_timeout.as_secs()
            );
            std::process::exit(EXIT_DRAIN_TIMED_OUT);
        });
    });
    token
}

/// Runs a start-up check until it succeeds, fails for good, or `timeout` passes.
pub async fn retry_startup<F, Fut, E>(what: &str, timeout: Duration, mut check: F) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display + Retryable,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(200);
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(err) if err.retryable() && tokio::time::Instant::now() + delay < deadline => {
                warn!(error = %err, "{what} not ready yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(err) => return Err(err),
        }
    }
}

/// Errors that say whether a retry can help.
pub trait Retryable {
    /// Whether a retry can help.
    fn retryable(&self) -> bool;
}

impl Retryable for outbox_pg::PgError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

impl Retryable for outbox_kafka::BusError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

impl Retryable for sink_clickhouse::SinkError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

/// The ClickHouse row of the demo table `user_logins`.
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
pub struct UserLoginRow {
    /// The Postgres row id.
    pub id: u64,
    /// Who.
    pub username: String,
    /// What.
    pub event_type: String,
    /// When, seconds since the epoch (ClickHouse `DateTime`).
    pub event_time: u32,
    /// Event id.
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: uuid::Uuid,
    /// Kafka partition.
    pub kafka_partition: i32,
    /// Kafka offset.
    pub kafka_offset: i64,
    /// Ingestion time.
    pub ingested_at: u32,
}

/// The JSON payload of a `user_logins` event (the row as Postgres renders it).
#[derive(Debug, Deserialize)]
struct UserLoginPayload {
    id: u64,
    username: String,
    event_type: String,
    event_time: String,
}

/// Maps `user_events` records to [`UserLoginRow`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserLoginMapper;

impl RowMapper for UserLoginMapper {
    type Row = UserLoginRow;

    fn columns_ddl(&self) -> String {
        "id UInt64, username String, event_type String, event_time DateTime".into()
    }

    fn map(&self, record: &Record, meta: RowMeta) -> Result<UserLoginRow, String> {
        let payload = record.payload.as_deref().ok_or("message has no payload")?;
        let parsed: UserLoginPayload = serde_json::from_slice(payload)
            .map_err(|e| format!("payload is not a user_logins row: {e}"))?;
        let time = time::OffsetDateTime::parse(
            &parsed.event_time,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|e| format!("event_time {:?} is not RFC 3339: {e}", parsed.event_time))?;
        let event_time = u32::try_from(time.unix_timestamp()).map_err(|_| {
            format!(
                "event_time {:?} does not fit ClickHouse DateTime (1970..2106)",
                parsed.event_time
            )
        })?;
        Ok(UserLoginRow {
            id: parsed.id,
            username: parsed.username,
            event_type: parsed.event_type,
            event_time,
            event_id: meta.event_id,
            kafka_partition: meta.kafka_partition,
            kafka_offset: meta.kafka_offset,
            ingested_at: meta.ingested_at,
        })
    }
}
