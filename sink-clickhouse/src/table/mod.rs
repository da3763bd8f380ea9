//! Rows driven by the table: the sink reads an existing table's columns and
//! encodes each JSON payload to RowBinary itself, so any topic can go into
//! any table without a Rust mapper.

mod schema;
mod types;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clickhouse::Client;
use outbox_core::Record;
use serde_json::Value;
use tracing::{debug, info};

use crate::client::bounded;
use crate::mapper::{Mapped, Mapping, RowMeta};
use crate::{SinkError, ValidClickHouseConfig};
use schema::{ColumnRow, Document, Groups, Schema};

/// What to do when a payload has no value for a column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MissingField {
    /// The column's default: its `DEFAULT` expression if it has one, else
    /// the type's zero value (`NULL` for `Nullable`). A `null` field of a
    /// column that is not `Nullable` counts as missing. Default.
    #[default]
    Default,
    /// Dead-letter the record, naming the column.
    DeadLetter,
}

/// Whether payloads are rows, or change envelopes of the WAL source
/// (`op`, `before`, `after`, `source`; docs/wal.md) whose row is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Changes {
    /// Each payload is a row. Default.
    #[default]
    Off,
    /// Each change is one row, appended: `after` (or `before` for a
    /// delete) to the columns, and the change's facts into the columns
    /// named `_op`, `_deleted`, `_lsn`, `_ordinal`, `_commit_time`,
    /// `_version` where the table has them.
    Log,
    /// The table keeps the latest state of each row: as `Log`, into a
    /// `ReplacingMergeTree(_version)` ordered by the primary key, whose
    /// `_version` (UInt64 or UInt128) is the change's place in commit order
    /// and `_deleted` marks deletes. Read it with `FINAL … WHERE NOT
    /// _deleted`, or `argMax` by `_version` (docs/tables.md).
    State,
}

/// What to do with a payload field no column reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnknownField {
    /// Ignore it. Default.
    #[default]
    Ignore,
    /// Dead-letter the record, naming the fields.
    DeadLetter,
}

/// How [`TableRows`] maps payloads to the columns of its table. Defaults:
/// every column reads the payload field of its own name, missing fields get
/// the column's default, unknown fields are ignored, the columns are read
/// again every 30 s, and at most every second for fields without a column.
///
/// ```
/// use sink_clickhouse::{MissingField, TableRowsConfig};
///
/// let config = TableRowsConfig {
///     // column `user` reads field `username`; `city` reads a nested field.
///     fields: [("user".into(), "username".into()), ("city".into(), "/address/city".into())].into(),
///     missing: MissingField::DeadLetter,
///     ..TableRowsConfig::default()
/// };
/// assert_eq!(config.fields["city"], "/address/city");
/// ```
#[derive(Debug, Clone)]
pub struct TableRowsConfig {
    /// Column → where its value is in the payload: a top-level field name,
    /// or a JSON pointer (RFC 6901, starting with `/`) for a nested one.
    /// Columns not listed read the field of their own name.
    pub fields: BTreeMap<String, String>,
    /// A payload without a value for a column.
    pub missing: MissingField,
    /// A payload field no column reads.
    pub unknown: UnknownField,
    /// How often the table's columns are read again, so that a column added
    /// (or dropped, or retyped) while the sink runs is used without a
    /// restart. A payload field without a column also triggers a read, at
    /// once the first time it is seen after the last read, then at most
    /// every [`TableRowsConfig::recheck_unknown`].
    pub refresh_interval: Duration,
    /// How soon a field already seen without a column may read the columns
    /// again: the longest a column added for it waits to be used, and the
    /// most often a stream that always carries a field the table does not
    /// want reads `system.columns`. Default: 1 s.
    pub recheck_unknown: Duration,
    /// Payloads are rows, or change envelopes. Default: rows.
    pub changes: Changes,
    /// With [`Changes::State`] and `create_columns`: the primary key
    /// columns the created table is ordered by (`id`, or `(a, b)`).
    pub order_by: Option<String>,
    /// Columns of the table (`name Type, …`, without the four meta
    /// columns) for creating it when it does not exist and
    /// [`ClickHouseConfig::create_tables`](crate::ClickHouseConfig::create_tables)
    /// is set. Default: none, the table must exist.
    pub create_columns: Option<String>,
    /// A `String` or `FixedString(32)` column (or `Nullable` of either)
    /// that gets the trace id of each record's W3C `traceparent` header
    /// (32 hex digits; empty, or NULL, without one), so that a slow or odd
    /// row can be looked up in the tracing backend. Default: none.
    pub trace_id_column: Option<String>,
}

impl Default for TableRowsConfig {
    fn default() -> Self {
        Self {
            fields: BTreeMap::new(),
            missing: MissingField::Default,
            unknown: UnknownField::Ignore,
            refresh_interval: Duration::from_secs(30),
            recheck_unknown: Duration::from_secs(1),
            changes: Changes::Off,
            order_by: None,
            create_columns: None,
            trace_id_column: None,
        }
    }
}

/// Writes JSON payloads into an existing table by its own columns: the
/// [`Mapping`] of a [`ClickHouseSink`](crate::ClickHouseSink) for a table
/// without a Rust mapper.
///
/// At start the sink reads the table's columns from `system.columns`: a
/// column of a type the encoder does not know, or a table without the four
/// meta columns (`event_id`, `kafka_partition`, `kafka_offset`,
/// `ingested_at`, which the exactly-once lookup reads), is a
/// [`SinkError::Config`] naming the column, or the `ALTER TABLE` to run.
/// Then each payload (a JSON object) becomes one row: a value that does not
/// fit its column (overflow, a bad date, the wrong JSON type) dead-letters
/// that record with the column and the reason, and the rest of the batch is
/// written. `MATERIALIZED` and `ALIAS` columns are left to the server.
///
/// Types: `Int8`–`Int128`, `UInt8`–`UInt128`, `Float32/64`, `Bool`,
/// `Decimal(P, S)` up to 38 digits (exact: never rounded), `String`,
/// `FixedString(N)`, `UUID`, `Date`, `Date32`, `DateTime`,
/// `DateTime64(p)` (from ISO-8601 text, UTC unless it carries an offset,
/// or epoch seconds), `Enum8/16` (by name), `IPv4`, `IPv6`, `Nullable`,
/// `LowCardinality`, `Array`, `Map`, `Tuple`, `SimpleAggregateFunction`.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use sink_clickhouse::{ClickHouseConfig, ClickHouseSink, TableRows, TableRowsConfig};
///
/// let config = ClickHouseConfig { table: "page_views".into(), ..ClickHouseConfig::default() };
/// let sink = ClickHouseSink::new(config.validate()?, TableRows::new(TableRowsConfig::default())).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TableRows {
    config: TableRowsConfig,
    schema: Option<Arc<Schema>>,
    read_at: Option<Instant>,
    /// Fields seen without a column since the last read of the columns:
    /// seeing them again does not read the columns again.
    absent: HashSet<String>,
}

impl TableRows {
    /// Rows of the sink's table, mapped by `config`.
    pub fn new(config: TableRowsConfig) -> Self {
        Self {
            config,
            schema: None,
            read_at: None,
            absent: HashSet::new(),
        }
    }

    async fn read_schema(
        &mut self,
        client: &Client,
        config: &ValidClickHouseConfig,
    ) -> Result<Arc<Schema>, SinkError> {
        let query = columns_query(client, config).fetch_all::<ColumnRow>();
        let rows = bounded(config, "column lookup", query).await?;
        let table = format!("{}.{}", config.database, config.table);
        let schema = Schema::new(&table, &rows, &self.config).map_err(SinkError::Config)?;
        let changed = self
            .schema
            .as_ref()
            .is_some_and(|old| !old.same_columns(&schema));
        if changed {
            info!(
                table,
                "the table's columns changed: rows are written with the new ones"
            );
        }
        let schema = Arc::new(schema);
        self.schema = Some(schema.clone());
        self.read_at = Some(Instant::now());
        self.absent.clear();
        Ok(schema)
    }

    fn encode_all(
        &self,
        schema: &Schema,
        records: &[(&Record, RowMeta)],
    ) -> (Groups, Vec<(usize, String)>, Vec<String>) {
        let mut groups = Groups::default();
        let mut refused = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        let mut row = Vec::new();
        for (i, (record, meta)) in records.iter().enumerate() {
            row.clear();
            let trace = if schema.has_trace_column() {
                Some(schema::traceparent_trace_id(&record.headers).unwrap_or_default())
            } else {
                None
            };
            let trace = trace.as_deref();
            let encoded = match record.payload.as_deref() {
                None => Err("the record has no payload".to_string()),
                Some(bytes) if schema.reads_changes() => serde_json::from_slice::<Value>(bytes)
                    .map_err(|e| format!("the payload is not JSON: {e}"))
                    .and_then(|doc| schema.change_rows(doc))
                    .and_then(|rows| {
                        // The old key's deleted row, if any, goes as a row
                        // of its own, before the change's.
                        let last = rows.len().saturating_sub(1);
                        for (at, (tree, change)) in rows.into_iter().enumerate() {
                            let encoded = schema.encode_into(
                                &Document::Tree(tree),
                                meta,
                                (Some(&change), trace),
                                &mut row,
                            )?;
                            if at == last {
                                return Ok(encoded);
                            }
                            groups.push_bytes(encoded.0, &row);
                            row.clear();
                        }
                        Err("the change has no row".to_string())
                    }),
                Some(bytes) => schema
                    .parse(bytes)
                    .and_then(|doc| schema.encode_into(&doc, meta, (None, trace), &mut row)),
            };
            match encoded {
                Ok((omitted, fields)) => {
                    for name in &fields {
                        if !unknown.contains(name) {
                            unknown.push(name.clone());
                        }
                    }
                    if self.config.unknown == UnknownField::DeadLetter && !fields.is_empty() {
                        refused.push((
                            i,
                            format!(
                                "fields without a column: {} (the route dead-letters unknown fields)",
                                fields.join(", ")
                            ),
                        ));
                    } else {
                        groups.push_bytes(omitted, &row);
                    }
                }
                Err(reason) => refused.push((i, reason)),
            }
        }
        (groups, refused, unknown)
    }
}

/// The lookup of the table's columns.
pub(crate) fn columns_query(
    client: &Client,
    config: &ValidClickHouseConfig,
) -> clickhouse::query::Query {
    client
        .query(
            "SELECT name, type, default_kind, is_in_sorting_key FROM system.columns \
             WHERE database = ? AND table = ?",
        )
        .bind(&config.database)
        .bind(&config.table)
}

/// RowBinary of `payloads` for a table of `columns` (name, type; every
/// column plain, no `DEFAULT`) followed by the four meta columns, as the
/// sink sends them, each row with its meta: for checking the bytes on other
/// ClickHouse versions.
pub(crate) fn encode_payloads(
    columns: &[(&str, &str)],
    rows: &[(Value, RowMeta)],
) -> Result<Vec<u8>, String> {
    let column_rows: Vec<ColumnRow> = columns
        .iter()
        .chain(schema::META_COLUMNS.iter())
        .map(|(name, ty)| ColumnRow {
            name: (*name).to_string(),
            r#type: (*ty).to_string(),
            default_kind: String::new(),
            is_in_sorting_key: 0,
        })
        .collect();
    let schema = Schema::new("check", &column_rows, &TableRowsConfig::default())?;
    let mut out = Vec::new();
    for (payload, meta) in rows {
        out.extend(schema.encode(payload, meta, None)?.bytes);
    }
    Ok(out)
}

/// A batch encoded with one version of the table's columns.
#[doc(hidden)]
#[derive(Debug)]
pub struct TableBatch {
    schema: Arc<Schema>,
    groups: Groups,
}

impl crate::mapper::sealed::Sealed for TableRows {}

#[async_trait]
impl Mapping for TableRows {
    type Rows = TableBatch;

    fn columns_ddl(&self) -> Option<String> {
        let columns = self.config.create_columns.clone()?;
        Some(match self.config.changes {
            Changes::State => format!("{columns}, _version UInt64, _deleted UInt8"),
            Changes::Log | Changes::Off => columns,
        })
    }

    fn order_by(&self) -> String {
        match (&self.config.changes, &self.config.order_by) {
            (Changes::State, Some(key)) => key.clone(),
            _ => "(kafka_partition, kafka_offset)".into(),
        }
    }

    fn replacing_columns(&self) -> Option<(&str, &str)> {
        (self.config.changes == Changes::State).then_some(("_version", "_deleted"))
    }

    async fn start(
        &mut self,
        client: &Client,
        config: &ValidClickHouseConfig,
    ) -> Result<(), SinkError> {
        self.read_schema(client, config).await.map(drop)
    }

    async fn map_batch(
        &mut self,
        client: &Client,
        config: &ValidClickHouseConfig,
        records: &[(&Record, RowMeta)],
    ) -> Result<Mapped<TableBatch>, SinkError> {
        let due = match (&self.schema, self.read_at) {
            (Some(schema), Some(at)) if at.elapsed() < self.config.refresh_interval => {
                schema.clone()
            }
            _ => self.read_schema(client, config).await?,
        };
        let (mut groups, mut refused, unknown) = self.encode_all(&due, records);
        let mut schema = due;
        let recheck = !unknown.is_empty()
            && (unknown.iter().any(|name| !self.absent.contains(name))
                || self
                    .read_at
                    .map_or(true, |at| at.elapsed() >= self.config.recheck_unknown));
        if recheck {
            // A field the columns did not know: its column may have been
            // added since they were read.
            debug!(fields = ?unknown, "fields without a column: reading the columns again");
            schema = self.read_schema(client, config).await?;
            let again = self.encode_all(&schema, records);
            (groups, refused) = (again.0, again.1);
            self.absent.extend(again.2);
        }
        Ok(Mapped {
            rows: TableBatch { schema, groups },
            refused,
        })
    }

    fn row_count(rows: &TableBatch) -> usize {
        rows.groups.rows()
    }

    async fn insert(
        &mut self,
        client: &Client,
        config: &ValidClickHouseConfig,
        table: &str,
        rows: TableBatch,
        token: Option<&str>,
    ) -> Result<usize, SinkError> {
        let inserts = rows.groups.groups.len();
        for (group, (omitted, (bytes, _))) in rows.groups.groups.into_iter().enumerate() {
            let sql = format!(
                "INSERT INTO `{}`.`{table}` ({}) FORMAT RowBinary",
                config.database,
                rows.schema.column_list(&omitted)
            );
            let mut insert = client
                .insert_formatted_with(sql)
                .with_timeouts(Some(config.insert_timeout), Some(config.insert_timeout));
            if let Some(token) = token {
                // Groups split one batch's rows the same way every time.
                insert =
                    insert.with_setting("insert_deduplication_token", format!("{token}-{group}"));
            }
            let sent = async {
                insert.send(bytes::Bytes::from(bytes)).await?;
                insert.end().await
            }
            .await;
            if let Err(e) = sent {
                let mut err = SinkError::request(&config.url, "insert", e);
                // The columns may have changed under the batch (a column
                // dropped or retyped): then the retry, encoded with the
                // columns read now, can succeed.
                self.read_at = None;
                let before = rows.schema.clone();
                if let Ok(now) = self.read_schema(client, config).await {
                    if !now.same_columns(&before) {
                        if let SinkError::Request {
                            retryable, detail, ..
                        } = &mut err
                        {
                            *retryable = true;
                            detail.push_str(
                                "; the table's columns changed: retrying with the new ones",
                            );
                        }
                    }
                }
                return Err(err);
            }
        }
        Ok(inserts)
    }
}
