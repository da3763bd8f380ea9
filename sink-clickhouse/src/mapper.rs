//! Turning a consumed record into a typed ClickHouse row.

use async_trait::async_trait;
use clickhouse::{Client, Row, RowOwned, RowWrite};
use outbox_core::Record;
use serde::Serialize;
use uuid::Uuid;

use crate::{SinkError, ValidClickHouseConfig};

/// What the sink adds to every row, besides what the mapper takes from the payload.
#[derive(Debug, Clone, Copy)]
pub struct RowMeta {
    /// The event id.
    pub event_id: Uuid,
    /// Kafka partition the record was read from.
    pub kafka_partition: i32,
    /// Kafka offset of the record.
    pub kafka_offset: i64,
    /// When the sink wrote it (seconds since the Unix epoch).
    pub ingested_at: u32,
}

/// The columns every sink table has, after the mapper's own columns. The sink
/// finds what is already written through `kafka_partition` and `kafka_offset`.
pub const META_COLUMNS_DDL: &str =
    "event_id UUID, kafka_partition Int32, kafka_offset Int64, ingested_at DateTime";

/// Maps records to rows of one table.
///
/// `Row` must carry the payload columns of [`RowMapper::columns_ddl`] and the
/// four meta columns (`event_id`, `kafka_partition`, `kafka_offset`,
/// `ingested_at`; see [`META_COLUMNS_DDL`]); fields are matched by name.
/// A mapping error dead-letters that one record with the returned reason.
///
/// ```
/// use clickhouse::Row;
/// use outbox_core::Record;
/// use serde::{Deserialize, Serialize};
/// use sink_clickhouse::{RowMapper, RowMeta};
///
/// #[derive(Row, Serialize)]
/// struct Click {
///     url: String,
///     #[serde(with = "clickhouse::serde::uuid")]
///     event_id: uuid::Uuid,
///     kafka_partition: i32,
///     kafka_offset: i64,
///     ingested_at: u32,
/// }
///
/// #[derive(Deserialize)]
/// struct Payload { url: String }
///
/// struct ClickMapper;
///
/// impl RowMapper for ClickMapper {
///     type Row = Click;
///     fn columns_ddl(&self) -> String { "url String".into() }
///     fn map(&self, record: &Record, meta: RowMeta) -> Result<Click, String> {
///         let payload = record.payload.as_deref().ok_or("no payload")?;
///         let p: Payload = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
///         Ok(Click { url: p.url, event_id: meta.event_id, kafka_partition: meta.kafka_partition,
///                    kafka_offset: meta.kafka_offset, ingested_at: meta.ingested_at })
///     }
/// }
/// ```
pub trait RowMapper: Send + Sync + 'static {
    /// The row type inserted with RowBinary.
    type Row: Row + RowOwned + RowWrite + Serialize + Send + Sync;

    /// Column definitions of the payload columns, for `CREATE TABLE`.
    fn columns_ddl(&self) -> String;

    /// Sort key of the table (`ORDER BY`). Default: the bus position, which
    /// is also what the sink looks rows up by.
    fn order_by(&self) -> String {
        "(kafka_partition, kafka_offset)".into()
    }

    /// Builds the row, or says why this record can never be a row.
    fn map(&self, record: &Record, meta: RowMeta) -> Result<Self::Row, String>;
}

/// A row holding the whole event envelope, for tables that keep events as they came.
#[derive(Debug, Clone, Row, Serialize, serde::Deserialize)]
pub struct RawEventRow {
    /// Topic.
    pub topic: String,
    /// Key as text (lossy for binary keys).
    pub key: String,
    /// Payload as text (lossy for binary payloads).
    pub payload: String,
    /// Application headers as a JSON object.
    pub headers: String,
    /// Event creation time, seconds since the epoch.
    pub created_at: u32,
    /// Event id.
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// Kafka partition.
    pub kafka_partition: i32,
    /// Kafka offset.
    pub kafka_offset: i64,
    /// Ingestion time, seconds since the epoch.
    pub ingested_at: u32,
}

/// Stores every event as a [`RawEventRow`].
///
/// ```
/// use sink_clickhouse::{RawEventMapper, RowMapper};
/// assert!(RawEventMapper.columns_ddl().contains("payload String"));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RawEventMapper;

impl RowMapper for RawEventMapper {
    type Row = RawEventRow;

    fn columns_ddl(&self) -> String {
        "topic String, key String, payload String, headers String, created_at DateTime".into()
    }

    fn map(&self, record: &Record, meta: RowMeta) -> Result<RawEventRow, String> {
        let event = record.to_event().map_err(|e| e.to_string())?;
        let headers = serde_json::to_string(&event.headers).map_err(|e| e.to_string())?;
        let created_s = u32::try_from(event.created_at_ms() / 1000).unwrap_or(u32::MAX);
        Ok(RawEventRow {
            topic: event.topic,
            key: event.key.map(|k| text_of(&k)).unwrap_or_default(),
            payload: text_of(&event.payload),
            headers,
            created_at: created_s,
            event_id: meta.event_id,
            kafka_partition: meta.kafka_partition,
            kafka_offset: meta.kafka_offset,
            ingested_at: meta.ingested_at,
        })
    }
}

/// `bytes` as text, invalid UTF-8 replaced. Checked first as a whole:
/// `String::from_utf8_lossy` walks valid text chunk by chunk, a visible
/// share of the consumer's profile on a backlog (docs/performance.md).
fn text_of(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

pub(crate) mod sealed {
    /// Keeps [`super::Mapping`] to the two kinds this crate writes.
    pub trait Sealed {}
}

/// A batch mapped to rows, and the records that can never be rows.
#[doc(hidden)]
#[derive(Debug)]
pub struct Mapped<R> {
    /// The rows, ready for one insert.
    pub rows: R,
    /// Index into the batch, and why that record can never be a row.
    pub refused: Vec<(usize, String)>,
}

/// How a [`ClickHouseSink`](crate::ClickHouseSink) turns records into rows
/// of its table: a typed [`RowMapper`] of your own (every `RowMapper` is a
/// `Mapping`), or [`TableRows`](crate::TableRows), which reads the table's
/// columns and needs no Rust. Implemented by this crate only.
#[async_trait]
pub trait Mapping: sealed::Sealed + Send + Sync + 'static {
    #[doc(hidden)]
    type Rows: Send;

    /// Payload columns for `CREATE TABLE`, or `None` when the table must exist.
    #[doc(hidden)]
    fn columns_ddl(&self) -> Option<String>;

    #[doc(hidden)]
    fn order_by(&self) -> String;

    /// The version and deleted-flag columns of a created
    /// `ReplacingMergeTree` (a state table).
    #[doc(hidden)]
    fn replacing_columns(&self) -> Option<(&str, &str)> {
        None
    }

    /// Once, when the sink starts (after its tables were created).
    #[doc(hidden)]
    async fn start(
        &mut self,
        client: &Client,
        config: &ValidClickHouseConfig,
    ) -> Result<(), SinkError>;

    #[doc(hidden)]
    async fn map_batch(
        &mut self,
        client: &Client,
        config: &ValidClickHouseConfig,
        records: &[(&Record, RowMeta)],
    ) -> Result<Mapped<Self::Rows>, SinkError>;

    #[doc(hidden)]
    fn row_count(rows: &Self::Rows) -> usize;

    /// Inserts `rows`; gives how many INSERT statements it took.
    #[doc(hidden)]
    async fn insert(
        &mut self,
        client: &Client,
        config: &ValidClickHouseConfig,
        table: &str,
        rows: Self::Rows,
        token: Option<&str>,
    ) -> Result<usize, SinkError>;
}

impl<M: RowMapper> sealed::Sealed for M {}

#[async_trait]
impl<M: RowMapper> Mapping for M {
    type Rows = Vec<M::Row>;

    fn columns_ddl(&self) -> Option<String> {
        Some(RowMapper::columns_ddl(self))
    }

    fn order_by(&self) -> String {
        RowMapper::order_by(self)
    }

    async fn start(&mut self, _: &Client, _: &ValidClickHouseConfig) -> Result<(), SinkError> {
        Ok(())
    }

    async fn map_batch(
        &mut self,
        _: &Client,
        _: &ValidClickHouseConfig,
        records: &[(&Record, RowMeta)],
    ) -> Result<Mapped<Vec<M::Row>>, SinkError> {
        let mut mapped = Mapped {
            rows: Vec::with_capacity(records.len()),
            refused: Vec::new(),
        };
        for (i, (record, meta)) in records.iter().enumerate() {
            match self.map(record, *meta) {
                Ok(row) => mapped.rows.push(row),
                Err(reason) => mapped.refused.push((i, reason)),
            }
        }
        Ok(mapped)
    }

    fn row_count(rows: &Vec<M::Row>) -> usize {
        rows.len()
    }

    async fn insert(
        &mut self,
        client: &Client,
        config: &ValidClickHouseConfig,
        table: &str,
        rows: Vec<M::Row>,
        token: Option<&str>,
    ) -> Result<usize, SinkError> {
        crate::sink::insert_typed(client, config, table, &rows, token).await?;
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::text_of;

    #[test]
    fn text_is_kept_and_invalid_utf8_replaced() {
        assert_eq!(text_of("héllo {\"a\":1}".as_bytes()), "héllo {\"a\":1}");
        assert_eq!(text_of(b"ok \xff\xfe end"), "ok \u{fffd}\u{fffd} end");
        assert_eq!(text_of(b""), "");
    }
}
