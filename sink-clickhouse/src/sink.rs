//! The ClickHouse [`Sink`]: batched RowBinary inserts, exactly-once by position.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use clickhouse::query::Query;
use clickhouse::{Client, Row};
use outbox_core::{Position, RecentIds, Record, Sink, WriteReport};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::client::{
    bounded, check_connection, client_for, parse_version, write_settings, ServerFacts,
};
use crate::exactly_once::{advance, dedup_token, lookups_needed, plan, PartitionState};
use crate::mapper::{Mapping, RowMeta};
use crate::{SinkError, ValidClickHouseConfig};

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
/// [`ClickHouseConfig::dedup_window`](crate::ClickHouseConfig::dedup_window) rows of each partition, loaded from
/// the table when it looks a partition up, and more as needed to cover
/// [`ClickHouseConfig::dedup_horizon`](crate::ClickHouseConfig::dedup_horizon) of publishing time at any rate; it
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
/// let sink = ClickHouseSink::new(config.validate()?, RawEventMapper).await?;
/// # Ok(()) }
/// ```
pub struct ClickHouseSink<M: Mapping> {
    pub(crate) client: Client,
    pub(crate) config: ValidClickHouseConfig,
    pub(crate) mapper: M,
    pub(crate) partitions: HashMap<(String, i32), PartitionState>,
    pub(crate) facts: ServerFacts,
    /// When the table's active parts were last counted.
    pub(crate) parts_read_at: Option<std::time::Instant>,
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

impl<M: Mapping> ClickHouseSink<M> {
    /// Checks the server answers and creates the tables if
    /// [`ClickHouseConfig::create_tables`](crate::ClickHouseConfig::create_tables) is set.
    pub async fn new(config: ValidClickHouseConfig, mapper: M) -> Result<Self, SinkError> {
        let sink = Self {
            client: client_for(&config)?,
            config,
            mapper,
            partitions: HashMap::new(),
            facts: ServerFacts::default(),
            parts_read_at: None,
        };
        sink.check_connection().await?;
        let mut sink = sink;
        // Read first: the DDL depends on it.
        let version = bounded(
            &sink.config,
            "version check",
            sink.client.query("SELECT version()").fetch_one::<String>(),
        )
        .await?;
        sink.facts.version = parse_version(&version);
        if sink.config.create_tables {
            sink.create_tables().await?;
        }
        let facts = sink.server_facts().await?;
        sink.mapper.start(&sink.client, &sink.config).await?;
        sink.facts = facts.clone();
        let defaults = write_settings(&sink.config, &ServerFacts::default());
        for (name, value) in write_settings(&sink.config, &facts) {
            if !defaults.iter().any(|(n, _)| *n == name) {
                sink.client = sink.client.with_setting(name, value);
            }
        }
        if sink.config.insert_dedup_token && !facts.dedup_token {
            warn!(
                url = %sink.config.url,
                "insert_dedup_token is set but the server has no insert_deduplication_token \
                 setting (ClickHouse 22.2 and later): inserts go without it"
            );
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

    /// What the sink learns of its server and table besides the version (read
    /// first, for the DDL): whether the table is `Distributed`, the cluster, the settings.
    /// `SHOW CREATE TABLE`, not `system.tables`: ClickHouse 18 fails a scan
    /// of `system.tables` when another client drops a table it lists.
    async fn server_facts(&self) -> Result<ServerFacts, SinkError> {
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
        let dedup_token = bounded(
            &self.config,
            "settings check",
            self.client
                .query(
                    "SELECT toUInt64(count()) FROM system.settings \
                     WHERE name = 'insert_deduplication_token'",
                )
                .fetch_one::<u64>(),
        )
        .await?
            > 0;
        Ok(ServerFacts {
            version: self.facts.version,
            distributed_table,
            replicas_per_shard,
            dedup_token,
        })
    }

    /// Runs `SELECT 1` (see [`check_connection`]).
    pub async fn check_connection(&self) -> Result<(), SinkError> {
        check_connection(&self.config).await
    }

    /// Offsets at or after `from` already stored for this partition, each
    /// with the event id stored there.
    async fn stored_offsets(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
    ) -> Result<BTreeMap<i64, String>, SinkError> {
        let query = self
            .position_lookup(topic, partition, from)
            .fetch_all::<OffsetRow>();
        let rows = bounded(&self.config, "position lookup", query).await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.kafka_offset, r.event_id))
            .collect())
    }

    /// The query of [`Self::stored_offsets`].
    pub(crate) fn position_lookup(&self, topic: &str, partition: i32, from: i64) -> Query {
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
        self.client
            .query(&sql)
            .bind(partition)
            .bind(from)
            .bind(topic)
            .bind(partition)
            .bind(from)
    }

    /// The query of [`Self::recent_ids`]: the ids of the latest `window`
    /// rows of a partition.
    pub(crate) fn id_lookup(&self, partition: i32, window: usize) -> Query {
        let window = i64::try_from(window).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT event_id FROM {table} WHERE kafka_partition = ? AND kafka_offset > \
               (SELECT max(kafka_offset) FROM {table} WHERE kafka_partition = ?) - ? \
             ORDER BY kafka_offset",
            table = self.table_ref()
        );
        self.client
            .query(&sql)
            .bind(partition)
            .bind(partition)
            .bind(window)
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
        let query = self.id_lookup(partition, capacity).fetch_all::<IdRow>();
        let rows = bounded(&self.config, "event id lookup", query).await?;
        for row in rows {
            recent.insert(row.event_id);
        }
        Ok(recent)
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
        let mut dead = Vec::new();
        let mut to_map = Vec::with_capacity(records.len());
        for (record, _) in records.iter().zip(&plan.write).filter(|(_, write)| **write) {
            match record.event_id() {
                Ok(event_id) => to_map.push((
                    record,
                    RowMeta {
                        event_id,
                        kafka_partition: record.position.partition,
                        kafka_offset: record.position.offset,
                        ingested_at,
                    },
                )),
                Err(e) => {
                    let reason = e.to_string();
                    dead.push(dead_letter_row(record, &reason, ingested_at));
                    report.dead_lettered.push((record.position, reason));
                }
            }
        }
        let mapped = self
            .mapper
            .map_batch(&self.client, &self.config, &to_map)
            .await?;
        let refused: std::collections::HashSet<usize> =
            mapped.refused.iter().map(|(i, _)| *i).collect();
        for (i, reason) in mapped.refused {
            let record = to_map[i].0;
            dead.push(dead_letter_row(record, &reason, ingested_at));
            report.dead_lettered.push((record.position, reason));
        }
        // Where the server has it, each insert carries a token of exactly
        // the rows it holds: a second line of defence should a lookup miss
        // rows that were written (a lagging replica), since the same rows
        // again are then dropped by the server's insert deduplication.
        let tokens = (self.config.insert_dedup_token && self.facts.dedup_token).then(|| {
            let rows = to_map
                .iter()
                .enumerate()
                .filter(|(i, _)| !refused.contains(i))
                .map(|(_, (record, _))| *record);
            let dead_positions: std::collections::HashSet<(i32, i64)> = dead
                .iter()
                .map(|d| (d.kafka_partition, d.kafka_offset))
                .collect();
            let dead_rows = records
                .iter()
                .filter(|r| dead_positions.contains(&(r.position.partition, r.position.offset)));
            (
                dedup_token(&self.config.table, rows),
                dedup_token(&self.config.dead_letter_table, dead_rows),
            )
        });
        // Dead letters first: if the process dies between the two inserts,
        // both kinds of rows are found by the position lookup on restart.
        insert_typed(
            &self.client,
            &self.config,
            &self.config.dead_letter_table,
            &dead,
            tokens.as_ref().map(|(_, dead)| dead.as_str()),
        )
        .await?;
        let written = M::row_count(&mapped.rows);
        if !dead.is_empty() {
            let dead_table = format!("{}.{}", self.config.database, self.config.dead_letter_table);
            metrics::counter!("outbox_sink_inserts_total", "table" => dead_table).increment(1);
        }
        if written > 0 {
            let table = self.config.table.clone();
            let token = tokens.as_ref().map(|(rows, _)| rows.as_str());
            let inserts = self
                .mapper
                .insert(&self.client, &self.config, &table, mapped.rows, token)
                .await?;
            let table = format!("{}.{}", self.config.database, self.config.table);
            metrics::counter!("outbox_sink_inserts_total", "table" => table)
                .increment(inserts as u64);
        }
        self.count_parts().await;
        report.written = written;
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

    /// Sets `outbox_sink_active_parts` to the table's active parts on the
    /// server the sink writes to, at most every 15 s: the number ClickHouse
    /// refuses inserts over ("Too many parts"). A failed count is skipped.
    async fn count_parts(&mut self) {
        if self
            .parts_read_at
            .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(15))
        {
            return;
        }
        self.parts_read_at = Some(std::time::Instant::now());
        let local = match &self.config.cluster {
            Some(cluster) => format!("{}{}", self.config.table, cluster.local_suffix),
            None => self.config.table.clone(),
        };
        let query = self
            .client
            .query(
                "SELECT toUInt64(count()) FROM system.parts \
                 WHERE database = ? AND table = ? AND active",
            )
            .bind(&self.config.database)
            .bind(&local)
            .fetch_one::<u64>();
        if let Ok(parts) = bounded(&self.config, "parts count", query).await {
            let table = format!("{}.{}", self.config.database, self.config.table);
            metrics::gauge!("outbox_sink_active_parts", "table" => table).set(parts as f64);
        }
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

/// One typed RowBinary insert of `rows` into `table`.
pub(crate) async fn insert_typed<R>(
    client: &Client,
    config: &ValidClickHouseConfig,
    table: &str,
    rows: &[R],
    token: Option<&str>,
) -> Result<(), SinkError>
where
    R: clickhouse::RowOwned + clickhouse::RowWrite,
{
    if rows.is_empty() {
        return Ok(());
    }
    let url = &config.url;
    let started = std::time::Instant::now();
    let mut insert = client
        .insert::<R>(table)
        .await
        .map_err(|e| SinkError::request(url, "insert", e))?
        .with_timeouts(Some(config.insert_timeout), Some(config.insert_timeout));
    if let Some(token) = token {
        insert = insert.with_setting("insert_deduplication_token", token);
    }
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
impl<M: Mapping> Sink for ClickHouseSink<M> {
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

impl<M: Mapping> ClickHouseSink<M> {
    /// The query of [`Self::stored_positions`].
    pub(crate) fn positions_query(&self) -> Query {
        self.client.query(&format!(
            "SELECT kafka_partition, max(kafka_offset) AS kafka_offset FROM {} \
             GROUP BY kafka_partition ORDER BY kafka_partition",
            self.table_ref()
        ))
    }

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
            .positions_query()
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
