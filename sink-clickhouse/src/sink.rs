//! The ClickHouse [`Sink`]: batched RowBinary inserts, exactly-once by position.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use clickhouse::{Client, Row};
use outbox_core::{Position, RecentIds, Record, Sink, WriteReport};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::exactly_once::{advance, lookups_needed, plan, PartitionState};
use crate::mapper::{RowMapper, RowMeta, META_COLUMNS_DDL};
use crate::{ClickHouseConfig, SinkError};

/// Writes consumed records into one ClickHouse table, each record once.
///
/// **How duplicates are avoided.** A record can come twice in two ways, and
/// both are handled.
///
/// *Redelivery of the same message* (the consumer died after the insert and
/// before its Kafka commit): every row stores the Kafka partition and
/// offset it came from. Whenever a partition's records do not continue
/// where this sink last wrote (at start, after a rebalance, after a failed
/// insert), the sink reads which offsets at or after the first one are
/// already stored, in the table and in the dead-letter table, with the
/// event id stored there, and skips a record only when its event id is the
/// stored one. A different id at a stored position means the topic started
/// over (its offsets restarted at 0): the write fails with the permanent
/// [`SinkError::OffsetRegression`] instead of losing the new event. So a consumer killed after the insert but before its Kafka commit
/// re-reads the batch and writes nothing twice, and an insert cut off by a
/// crash, which ClickHouse 18.16 keeps as whatever rows had arrived, is
/// completed with just the missing rows.
///
/// *A second copy of the event at a new offset* (the relay died after the
/// broker acknowledged the batch and before it removed the events from the
/// outbox, so they were published again): the copy carries the same event
/// id and lands in the same partition (same key; keyless events are placed
/// by id). The sink remembers the ids of the last
/// [`ClickHouseConfig::dedup_window`] rows of each partition, loaded from
/// the table when it looks a partition up, and more as needed to cover
/// [`ClickHouseConfig::dedup_horizon`] of publishing time at any rate; it
/// skips a record whose id is among them.
///
/// The table is a `ReplacingMergeTree` ordered by position, as a last
/// safety net.
///
/// Records that can never be rows (no event id, undecodable payload, values
/// that do not fit) go to the dead-letter table with their reason; the rest
/// of the batch is written.
///
/// Preconditions: one writer per partition at a time (the consumer group
/// gives each partition to one member) and one topic per table.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use sink_clickhouse::{ClickHouseConfig, ClickHouseSink, RawEventMapper};
///
/// let config = ClickHouseConfig { table: "events".into(), ..ClickHouseConfig::default() };
/// let sink = ClickHouseSink::new(config, RawEventMapper).await?;
/// # Ok(()) }
/// ```
pub struct ClickHouseSink<M: RowMapper> {
    client: Client,
    config: ClickHouseConfig,
    mapper: M,
    partitions: HashMap<(String, i32), PartitionState>,
    facts: ServerFacts,
}

#[derive(Row, Deserialize)]
struct IdRow {
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid,
}

#[derive(Row, Deserialize)]
struct OffsetRow {
    kafka_offset: i64,
    event_id: String,
}

/// A record the sink could never write, as kept in its dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct DeadLetterRow {
    /// Kafka topic.
    pub topic: String,
    /// Kafka partition.
    pub kafka_partition: i32,
    /// Kafka offset.
    pub kafka_offset: i64,
    /// The event id header (empty when the message had none).
    pub event_id: String,
    /// The message key (UTF-8, lossy).
    pub key: String,
    /// The payload (UTF-8, lossy).
    pub payload: String,
    /// Why it could not be written.
    pub reason: String,
    /// When, seconds since the epoch.
    pub failed_at: u32,
}

fn now_s() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// A client for `config`. Validation of row types against the schema is off:
/// ClickHouse 18.16 lacks the `RowBinaryWithNamesAndTypes` format it needs.
/// Speaks HTTP and HTTPS (the system's OpenSSL, verifying the server's
/// certificate and host name); fails when [`ClickHouseConfig::ca_file`]
/// cannot be read.
pub fn client_for(config: &ClickHouseConfig) -> Result<Client, SinkError> {
    // The crate's default client leaves Nagle's algorithm on: the last small
    // chunk of an insert body then waits for the server's delayed ACK, about
    // 40 ms on Linux, which tripled the cost of a small insert. Same pool
    // and keepalive settings as the default otherwise.
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
    connector.enforce_http(false);
    let mut tls = native_tls::TlsConnector::builder();
    if let Some(path) = &config.ca_file {
        let unreadable =
            |reason: String| SinkError::Config(format!("ca_file {}: {reason}", path.display()));
        let pem = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
        let certs = native_tls::Certificate::stack_from_pem(&pem)
            .map_err(|e| unreadable(format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(unreadable("holds no PEM certificate".into()));
        }
        // Pinned, as curl's --cacert: only the given CAs are trusted.
        tls.disable_built_in_roots(true);
        for cert in certs {
            tls.add_root_certificate(cert);
        }
    }
    let tls = tls
        .build()
        .map_err(|e| SinkError::Config(format!("cannot set up TLS: {e}")))?;
    let https = hyper_tls::HttpsConnector::from((connector, tls.into()));
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(2))
        .build(https);
    let mut client = Client::with_http_client(http)
        .with_url(&config.url)
        .with_user(&config.user)
        .with_password(&config.password)
        .with_database(&config.database)
        .with_validation(false);
    for (name, value) in write_settings(config, &ServerFacts::default()) {
        client = client.with_setting(name, value);
    }
    Ok(client)
}

/// What the sink learns of its server and table at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerFacts {
    /// `(major, minor)` of `SELECT version()`; `(0, 0)` unknown.
    pub version: (u32, u32),
    /// Whether the data table is a `Distributed` table.
    pub distributed_table: bool,
    /// Replicas of each shard of the configured cluster (`system.clusters`).
    pub replicas_per_shard: Vec<u32>,
}

/// The settings every write and lookup of the sink runs with: what keeps an
/// acknowledged insert durable where the lookups see it.
///
/// - An insert into a `Distributed` table (configured as a cluster, or found
///   to be one) is acknowledged only once every shard wrote its rows
///   (`insert_distributed_sync`); otherwise the server acknowledges rows it
///   has only queued, and a lookup right after would miss them.
/// - With `insert_quorum`, reads are sequentially consistent, so a lookup
///   never reads a replica behind the last quorum insert; servers that can
///   run quorum inserts in parallel (20.10 and later) are told not to, since
///   sequential consistency only holds for sequential quorum inserts.
pub(crate) fn write_settings(
    config: &ClickHouseConfig,
    facts: &ServerFacts,
) -> Vec<(&'static str, String)> {
    let mut settings = Vec::new();
    if config.cluster.is_some() || facts.distributed_table {
        settings.push(("insert_distributed_sync", "1".to_string()));
    }
    if let Some(cluster) = &config.cluster {
        let quorum = match cluster.insert_quorum {
            Some(quorum) => quorum,
            None if cluster.replicated => {
                facts.replicas_per_shard.iter().copied().min().unwrap_or(0)
            }
            None => 0,
        };
        // ClickHouse treats a quorum below 2 as no quorum.
        if quorum >= 2 {
            settings.push(("insert_quorum", quorum.to_string()));
            settings.push(("select_sequential_consistency", "1".to_string()));
            if facts.version >= (20, 10) {
                settings.push(("insert_quorum_parallel", "0".to_string()));
            }
        }
    }
    settings
}

/// `(major, minor)` of a ClickHouse version string such as `18.16.1`.
fn parse_version(text: &str) -> (u32, u32) {
    let mut parts = text
        .trim()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Runs `SELECT 1` on the server of `config`, with a classified error
/// (retryable when the server is down, permanent for bad credentials): the
/// start-up check of the binaries.
pub async fn check_connection(config: &ClickHouseConfig) -> Result<(), SinkError> {
    // A client without a database: the configured one may not exist yet.
    let probe = client_for(&ClickHouseConfig {
        database: "default".into(),
        ..config.clone()
    })?;
    probe
        .query("SELECT 1")
        .execute()
        .await
        .map_err(|e| SinkError::request(&config.url, "connection check", e))
}

impl<M: RowMapper> ClickHouseSink<M> {
    /// Validates `config`, checks the server answers and creates the tables
    /// if [`ClickHouseConfig::create_tables`] is set.
    pub async fn new(config: ClickHouseConfig, mapper: M) -> Result<Self, SinkError> {
        config.validate()?;
        let sink = Self {
            client: client_for(&config)?,
            config,
            mapper,
            partitions: HashMap::new(),
            facts: ServerFacts::default(),
        };
        sink.check_connection().await?;
        if sink.config.create_tables {
            sink.create_tables().await?;
        }
        let facts = sink.server_facts().await?;
        let mut sink = sink;
        sink.facts = facts.clone();
        let defaults = write_settings(&sink.config, &ServerFacts::default());
        for (name, value) in write_settings(&sink.config, &facts) {
            if !defaults.iter().any(|(n, _)| *n == name) {
                sink.client = sink.client.with_setting(name, value);
            }
        }
        if facts.distributed_table && sink.config.cluster.is_none() {
            warn!(
                table = %sink.table_ref(),
                "the table is Distributed but no cluster is configured: inserts wait for every shard \
                 (insert_distributed_sync=1); configure the cluster so lookups and DDL know it"
            );
        }
        Ok(sink)
    }

    /// The settings its inserts and lookups run with, as decided at start
    /// from the configuration, the server's version and the table's engine.
    pub fn write_settings(&self) -> Vec<(&'static str, String)> {
        write_settings(&self.config, &self.facts)
    }

    /// The server's version and whether the data table is `Distributed`.
    /// `SHOW CREATE TABLE`, not `system.tables`: ClickHouse 18 fails a scan
    /// of `system.tables` when another client drops a table it lists.
    async fn server_facts(&self) -> Result<ServerFacts, SinkError> {
        let version = bounded(
            &self.config,
            "version check",
            self.client.query("SELECT version()").fetch_one::<String>(),
        )
        .await?;
        let create = bounded(
            &self.config,
            "table check",
            self.client
                .query(&format!("SHOW CREATE TABLE {}", self.table_ref()))
                .fetch_optional::<String>(),
        )
        .await;
        // A table created later by someone else is looked at on the next start.
        let distributed_table = match create {
            Ok(Some(ddl)) => ddl.contains("ENGINE = Distributed"),
            Ok(None) | Err(_) => false,
        };
        let mut replicas_per_shard = Vec::new();
        if let Some(cluster) = &self.config.cluster {
            let counts = bounded(
                &self.config,
                "cluster lookup",
                self.client
                    .query(
                        "SELECT toUInt32(count()) FROM system.clusters WHERE cluster = ? \
                         GROUP BY shard_num ORDER BY shard_num",
                    )
                    .bind(&cluster.name)
                    .fetch_all::<u32>(),
            )
            .await?;
            if counts.is_empty() {
                return Err(SinkError::Config(format!(
                    "cluster {:?} is not defined on {} (remote_servers in the server's config)",
                    cluster.name, self.config.url
                )));
            }
            if cluster.replicated
                && cluster.insert_quorum.is_none()
                && counts.iter().min() != counts.iter().max()
            {
                warn!(
                    cluster = %cluster.name,
                    replicas_per_shard = ?counts,
                    "shards have different numbers of replicas: one insert_quorum applies to all, so the \
                     fewest is used and a lookup may read a lagging replica of a larger shard"
                );
            }
            replicas_per_shard = counts;
        }
        Ok(ServerFacts {
            version: parse_version(&version),
            distributed_table,
            replicas_per_shard,
        })
    }

    /// Runs `SELECT 1` (see [`check_connection`]).
    pub async fn check_connection(&self) -> Result<(), SinkError> {
        check_connection(&self.config).await
    }

    /// The DDL of the data table: the whole table on one server; with
    /// [`ClickHouseConfig::cluster`], the shards' local table (see
    /// [`ClickHouseSink::ddl`] for every statement).
    pub fn table_ddl(&self) -> String {
        let columns = format!("{}, {META_COLUMNS_DDL}", self.mapper.columns_ddl());
        self.local_ddl(
            &self.config.table,
            &columns,
            "Replacing",
            &self.mapper.order_by(),
        )
    }

    /// The DDL of the dead-letter table (its shards' local table with a cluster).
    pub fn dead_letter_ddl(&self) -> String {
        self.local_ddl(
            &self.config.dead_letter_table,
            "topic String, kafka_partition Int32, kafka_offset Int64, event_id String, \
             key String, payload String, reason String, failed_at DateTime",
            "",
            "(topic, kafka_partition, kafka_offset)",
        )
    }

    /// Every statement that creates the sink's tables, in order: the
    /// database, then for each table the table itself or, with a cluster,
    /// its local table and the `Distributed` table over it (sharded by
    /// `kafka_partition`, so that a partition's rows, and the lookups that
    /// keep exactly-once, stay on one shard).
    pub fn ddl(&self) -> Vec<String> {
        let on_cluster = self.on_cluster();
        let mut statements = vec![format!(
            "CREATE DATABASE IF NOT EXISTS `{}`{on_cluster}",
            self.config.database
        )];
        for (table, local) in [
            (&self.config.table, self.table_ddl()),
            (&self.config.dead_letter_table, self.dead_letter_ddl()),
        ] {
            statements.push(local);
            if let Some(cluster) = &self.config.cluster {
                let db = &self.config.database;
                let suffix = &cluster.local_suffix;
                statements.push(format!(
                    "CREATE TABLE IF NOT EXISTS `{db}`.`{table}`{on_cluster} AS `{db}`.`{table}{suffix}` \
                     ENGINE = Distributed(`{name}`, `{db}`, `{table}{suffix}`, kafka_partition)",
                    name = cluster.name
                ));
            }
        }
        statements
    }

    fn on_cluster(&self) -> String {
        match &self.config.cluster {
            Some(cluster) if cluster.on_cluster => format!(" ON CLUSTER `{}`", cluster.name),
            _ => String::new(),
        }
    }

    /// `CREATE TABLE` of a table of the sink (or of its shards' local table),
    /// on a `{variant}MergeTree` engine, replicated if so configured.
    fn local_ddl(&self, table: &str, columns: &str, variant: &str, order_by: &str) -> String {
        let db = &self.config.database;
        let on_cluster = self.on_cluster();
        let (name, engine) = match &self.config.cluster {
            None => (table.to_string(), format!("{variant}MergeTree()")),
            Some(cluster) => {
                let local = format!("{table}{}", cluster.local_suffix);
                let engine = if cluster.replicated {
                    // The {shard} and {replica} macros come from each server's config.
                    format!(
                        "Replicated{variant}MergeTree('/clickhouse/tables/{{shard}}/{db}/{local}', '{{replica}}')"
                    )
                } else {
                    format!("{variant}MergeTree()")
                };
                (local, engine)
            }
        };
        format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.`{name}`{on_cluster} ({columns}) ENGINE = {engine} ORDER BY {order_by}"
        )
    }

    async fn create_tables(&self) -> Result<(), SinkError> {
        // The configured database may not exist yet.
        let root = client_for(&ClickHouseConfig {
            database: "default".into(),
            ..self.config.clone()
        })?;
        for ddl in self.ddl() {
            root.query(&ddl)
                .execute()
                .await
                .map_err(|e| SinkError::request(&self.config.url, "create tables", e))?;
        }
        Ok(())
    }

    fn table_ref(&self) -> String {
        format!("`{}`.`{}`", self.config.database, self.config.table)
    }

    fn dead_letter_ref(&self) -> String {
        format!(
            "`{}`.`{}`",
            self.config.database, self.config.dead_letter_table
        )
    }

    /// Offsets at or after `from` already stored for this partition, each
    /// with the event id stored there.
    async fn stored_offsets(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
    ) -> Result<BTreeMap<i64, String>, SinkError> {
        let sql = format!(
            "SELECT kafka_offset, event_id FROM (\
               SELECT kafka_offset, toString(event_id) AS event_id FROM {} \
                 WHERE kafka_partition = ? AND kafka_offset >= ? \
               UNION ALL \
               SELECT kafka_offset, event_id FROM {} \
                 WHERE topic = ? AND kafka_partition = ? AND kafka_offset >= ?)",
            self.table_ref(),
            self.dead_letter_ref()
        );
        let query = self
            .client
            .query(&sql)
            .bind(partition)
            .bind(from)
            .bind(topic)
            .bind(partition)
            .bind(from)
            .fetch_all::<OffsetRow>();
        let rows = bounded(&self.config, "position lookup", query).await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.kafka_offset, r.event_id))
            .collect())
    }

    /// Ids of the latest `dedup_window` rows of a partition, oldest first.
    async fn recent_ids(&self, partition: i32) -> Result<RecentIds, SinkError> {
        let capacity = self.config.dedup_window;
        if capacity == 0 {
            return Ok(RecentIds::new(0));
        }
        let mut recent = RecentIds::with_horizon(
            capacity,
            self.config.dedup_horizon,
            self.config.dedup_window_max,
        );
        let window = i64::try_from(capacity).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT event_id FROM {table} WHERE kafka_partition = ? AND kafka_offset > \
               (SELECT max(kafka_offset) FROM {table} WHERE kafka_partition = ?) - ? \
             ORDER BY kafka_offset",
            table = self.table_ref()
        );
        let query = self
            .client
            .query(&sql)
            .bind(partition)
            .bind(partition)
            .bind(window)
            .fetch_all::<IdRow>();
        let rows = bounded(&self.config, "event id lookup", query).await?;
        for row in rows {
            recent.insert(row.event_id);
        }
        Ok(recent)
    }

    async fn insert_rows<R>(&self, table: &str, rows: &[R]) -> Result<(), SinkError>
    where
        R: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let url = &self.config.url;
        let started = std::time::Instant::now();
        let mut insert = self
            .client
            .insert::<R>(table)
            .await
            .map_err(|e| SinkError::request(url, "insert", e))?
            .with_timeouts(
                Some(self.config.insert_timeout),
                Some(self.config.insert_timeout),
            );
        for row in rows {
            insert
                .write(row)
                .await
                .map_err(|e| SinkError::request(url, "insert", e))?;
        }
        insert
            .end()
            .await
            .map_err(|e| SinkError::request(url, "insert", e))?;
        debug!(
            table,
            rows = rows.len(),
            insert_ms = started.elapsed().as_millis() as u64,
            "inserted"
        );
        Ok(())
    }

    async fn write_batch(&mut self, records: &[Record]) -> Result<WriteReport, SinkError> {
        // Look up every partition whose records do not continue where we left off.
        for ((topic, partition), first) in lookups_needed(&self.partitions, records) {
            let stored = self.stored_offsets(&topic, partition, first).await?;
            if !stored.is_empty() {
                debug!(
                    topic,
                    partition,
                    from = first,
                    already_stored = stored.len(),
                    "found records already written"
                );
            }
            let recent = self.recent_ids(partition).await?;
            self.partitions.insert(
                (topic, partition),
                PartitionState {
                    next_expected: first,
                    stored,
                    recent,
                    overruns_reported: 0,
                },
            );
        }
        let plan = plan(&self.partitions, records, self.config.dedup_window > 0).map_err(|r| {
            SinkError::OffsetRegression {
                topic: r.topic,
                partition: r.partition,
                offset: r.offset,
                table: format!("{}.{}", self.config.database, self.config.table),
                stored_event_id: r.stored_event_id,
                record_event_id: r.record_event_id,
            }
        })?;
        if plan.copies > 0 {
            debug!(copies = plan.copies, "second copies of events skipped");
        }

        let ingested_at = now_s();
        let mut report = WriteReport {
            duplicates: plan.duplicates + plan.copies,
            ..WriteReport::default()
        };
        let mut rows = Vec::with_capacity(records.len());
        let mut dead = Vec::new();
        for (record, _) in records.iter().zip(&plan.write).filter(|(_, write)| **write) {
            let mapped = record
                .event_id()
                .map_err(|e| e.to_string())
                .and_then(|event_id| {
                    self.mapper.map(
                        record,
                        RowMeta {
                            event_id,
                            kafka_partition: record.position.partition,
                            kafka_offset: record.position.offset,
                            ingested_at,
                        },
                    )
                });
            match mapped {
                Ok(row) => rows.push(row),
                Err(reason) => {
                    dead.push(dead_letter_row(record, &reason, ingested_at));
                    report.dead_lettered.push((record.position, reason));
                }
            }
        }
        // Dead letters first: if the process dies between the two inserts,
        // both kinds of rows are found by the position lookup on restart.
        self.insert_rows(&self.config.dead_letter_table, &dead)
            .await?;
        self.insert_rows(&self.config.table, &rows).await?;
        report.written = rows.len();
        advance(&mut self.partitions, records, plan.new_ids);
        self.report_overruns();
        for (position, reason) in &report.dead_lettered {
            warn!(
                partition = position.partition,
                offset = position.offset,
                reason,
                "record dead-lettered"
            );
        }
        Ok(report)
    }

    /// Counts and logs ids each partition's window had to forget too young.
    fn report_overruns(&mut self) {
        for ((topic, partition), state) in &mut self.partitions {
            let overruns = state.recent.overruns();
            if overruns > state.overruns_reported {
                metrics::counter!("outbox_sink_dedup_overruns_total")
                    .increment(overruns - state.overruns_reported);
                warn!(
                    topic,
                    partition,
                    window = state.recent.capacity(),
                    horizon_s = self.config.dedup_horizon.as_secs(),
                    forgotten_too_young = overruns - state.overruns_reported,
                    "the dedup window is at dedup_window_max and covers less than dedup_horizon at this \
                     rate: a relay's republished copy could be written twice; raise dedup_window_max"
                );
                state.overruns_reported = overruns;
            }
        }
    }
}

fn dead_letter_row(record: &Record, reason: &str, failed_at: u32) -> DeadLetterRow {
    let text = |bytes: &Option<bytes::Bytes>| {
        bytes
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    DeadLetterRow {
        topic: record.topic.clone(),
        kafka_partition: record.position.partition,
        kafka_offset: record.position.offset,
        event_id: record
            .headers
            .get(outbox_core::HEADER_EVENT_ID)
            .cloned()
            .unwrap_or_default(),
        key: text(&record.key),
        payload: text(&record.payload),
        reason: reason.to_string(),
        failed_at,
    }
}

#[async_trait]
impl<M: RowMapper> Sink for ClickHouseSink<M> {
    async fn write(&mut self, records: &[Record]) -> outbox_core::Result<WriteReport> {
        match self.write_batch(records).await {
            Ok(report) => Ok(report),
            Err(err) => {
                // What reached the table is unknown now: look it up on the retry.
                for record in records {
                    self.partitions
                        .remove(&(record.topic.clone(), record.position.partition));
                }
                Err(err.into())
            }
        }
    }

    /// Forgets what is known of every partition, so the next batch of each
    /// looks up what is stored: called by the consumer loop whenever
    /// ownership moved (another owner may have written meanwhile).
    fn forget_positions(&mut self) {
        self.partitions.clear();
    }
}

impl<M: RowMapper> ClickHouseSink<M> {
    /// The client, for queries of the caller's own.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Position of the last record written for each partition, from the table.
    pub async fn stored_positions(&self) -> Result<Vec<Position>, SinkError> {
        #[derive(Row, Deserialize)]
        struct Max {
            kafka_partition: i32,
            kafka_offset: i64,
        }
        let rows = self
            .client
            .query(&format!(
                "SELECT kafka_partition, max(kafka_offset) AS kafka_offset FROM {} GROUP BY kafka_partition ORDER BY kafka_partition",
                self.table_ref()
            ))
            .fetch_all::<Max>()
            .await
            .map_err(|e| SinkError::request(&self.config.url, "position lookup", e))?;
        Ok(rows
            .into_iter()
            .map(|r| Position {
                partition: r.kafka_partition,
                offset: r.kafka_offset,
            })
            .collect())
    }
}

/// Runs a query with the insert timeout as its limit: a server that stopped
/// answering must not hang the caller.
pub(crate) async fn bounded<T>(
    config: &ClickHouseConfig,
    operation: &'static str,
    query: impl std::future::Future<Output = clickhouse::error::Result<T>>,
) -> Result<T, SinkError> {
    match tokio::time::timeout(config.insert_timeout, query).await {
        Ok(result) => result.map_err(|e| SinkError::request(&config.url, operation, e)),
        Err(_) => Err(SinkError::request(
            &config.url,
            operation,
            clickhouse::error::Error::TimedOut,
        )),
    }
}

#[cfg(test)]
mod settings_tests {
    use super::*;
    use crate::ClusterConfig;

    fn names(config: &ClickHouseConfig, facts: &ServerFacts) -> Vec<String> {
        write_settings(config, facts)
            .into_iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect()
    }

    #[test]
    fn distributed_inserts_wait_for_the_shards_and_quorum_reads_are_sequential() {
        let one_server = ClickHouseConfig::default();
        assert!(names(&one_server, &ServerFacts::default()).is_empty());
        let found_distributed = ServerFacts {
            version: (18, 16),
            distributed_table: true,
            ..ServerFacts::default()
        };
        assert_eq!(
            names(&one_server, &found_distributed),
            ["insert_distributed_sync=1"]
        );
        let quorum = ClickHouseConfig {
            cluster: Some(ClusterConfig {
                insert_quorum: Some(2),
                ..ClusterConfig::new("c")
            }),
            ..ClickHouseConfig::default()
        };
        let old = ServerFacts {
            version: (18, 16),
            distributed_table: true,
            ..ServerFacts::default()
        };
        assert_eq!(
            names(&quorum, &old),
            [
                "insert_distributed_sync=1",
                "insert_quorum=2",
                "select_sequential_consistency=1"
            ]
        );
        let current = ServerFacts {
            version: (26, 9),
            distributed_table: true,
            ..ServerFacts::default()
        };
        assert!(names(&quorum, &current).contains(&"insert_quorum_parallel=0".to_string()));
        // Found from the cluster: the fewest replicas of any shard; 1 is no quorum.
        let auto = ClickHouseConfig {
            cluster: Some(ClusterConfig::new("c")),
            ..ClickHouseConfig::default()
        };
        let two_replicas = ServerFacts {
            version: (18, 16),
            replicas_per_shard: vec![2, 2],
            ..ServerFacts::default()
        };
        assert!(names(&auto, &two_replicas).contains(&"insert_quorum=2".to_string()));
        let uneven = ServerFacts {
            replicas_per_shard: vec![2, 1],
            ..two_replicas.clone()
        };
        assert!(!names(&auto, &uneven)
            .iter()
            .any(|s| s.starts_with("insert_quorum")));
        assert_eq!(parse_version("18.16.1"), (18, 16));
        assert_eq!(parse_version("26.9.2.1"), (26, 9));
        assert_eq!(parse_version("garbage"), (0, 0));
    }
}

#[cfg(test)]
mod ddl_tests {
    use super::*;
    use crate::{ClusterConfig, RawEventMapper};

    fn sink(cluster: Option<ClusterConfig>) -> Result<ClickHouseSink<RawEventMapper>, SinkError> {
        let config = ClickHouseConfig {
            database: "db".into(),
            table: "events".into(),
            cluster,
            ..ClickHouseConfig::default()
        };
        Ok(ClickHouseSink {
            client: client_for(&config)?,
            config,
            mapper: RawEventMapper,
            partitions: HashMap::new(),
            facts: ServerFacts::default(),
        })
    }

    #[test]
    fn one_server_gets_plain_tables() -> Result<(), SinkError> {
        let ddl = sink(None)?.ddl();
        assert_eq!(ddl.len(), 3, "{ddl:#?}");
        assert_eq!(ddl[0], "CREATE DATABASE IF NOT EXISTS `db`");
        assert!(ddl[1].starts_with("CREATE TABLE IF NOT EXISTS `db`.`events` ("));
        assert!(ddl[1].contains("ENGINE = ReplacingMergeTree() ORDER BY"));
        assert!(ddl[2].contains("`db`.`outbox_dead_letter`"));
        Ok(())
    }

    #[test]
    fn a_replicated_cluster_gets_local_replicated_and_distributed_tables_on_cluster(
    ) -> Result<(), SinkError> {
        let ddl = sink(Some(ClusterConfig::new("c1")))?.ddl();
        assert_eq!(ddl.len(), 5, "{ddl:#?}");
        assert_eq!(ddl[0], "CREATE DATABASE IF NOT EXISTS `db` ON CLUSTER `c1`");
        assert!(
            ddl[1].starts_with("CREATE TABLE IF NOT EXISTS `db`.`events_local` ON CLUSTER `c1` (")
        );
        assert!(ddl[1].contains(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db/events_local', '{replica}')"
        ));
        assert_eq!(
            ddl[2],
            "CREATE TABLE IF NOT EXISTS `db`.`events` ON CLUSTER `c1` AS `db`.`events_local` \
             ENGINE = Distributed(`c1`, `db`, `events_local`, kafka_partition)"
        );
        assert!(ddl[3].contains(
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/db/outbox_dead_letter_local', '{replica}')"
        ));
        assert!(
            ddl[4].contains("Distributed(`c1`, `db`, `outbox_dead_letter_local`, kafka_partition)")
        );
        Ok(())
    }

    #[test]
    fn hostile_cluster_names_are_refused() {
        for name in ["c1`; DROP TABLE x", "bad-name", ""] {
            let config = ClickHouseConfig {
                cluster: Some(ClusterConfig::new(name)),
                ..ClickHouseConfig::default()
            };
            assert!(config.validate().is_err(), "{name:?}");
        }
        let config = ClickHouseConfig {
            cluster: Some(ClusterConfig {
                local_suffix: "_l; --".into(),
                ..ClusterConfig::new("c")
            }),
            ..ClickHouseConfig::default()
        };
        assert!(config.validate().is_err());
    }
}
