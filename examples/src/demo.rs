//! The demo's ClickHouse row and its mapper.

use clickhouse::Row;
use outbox_core::Record;
use serde::{Deserialize, Serialize};
use sink_clickhouse::{RowMapper, RowMeta};

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

/// A `user_logins` change captured from the WAL (`--source wal`): the
/// envelope of `docs/wal.md`, of which the new row is read.
#[derive(Debug, Deserialize)]
struct UserLoginChange {
    op: String,
    after: Option<UserLoginPayload>,
}

/// Maps `user_events` records to [`UserLoginRow`]s: the flag table's rows,
/// and the same rows captured from the WAL (inserts and updates: the
/// ClickHouse table is a log of row versions; a delete has no row to log
/// and is dead-lettered with that reason).
#[derive(Debug, Clone, Copy, Default)]
pub struct UserLoginMapper;

impl RowMapper for UserLoginMapper {
    type Row = UserLoginRow;

    fn columns_ddl(&self) -> String {
        "id UInt64, username String, event_type String, event_time DateTime".into()
    }

    fn map(&self, record: &Record, meta: RowMeta) -> Result<UserLoginRow, String> {
        let payload = record.payload.as_deref().ok_or("message has no payload")?;
        let parsed: UserLoginPayload =
            if record.headers.contains_key(outbox_pg::wal::HEADER_WAL_LSN) {
                let change: UserLoginChange = serde_json::from_slice(payload)
                    .map_err(|e| format!("payload is not a user_logins change: {e}"))?;
                change.after.ok_or_else(|| {
                    format!(
                        "a change with op {:?} carries no new row to append",
                        change.op
                    )
                })?
            } else {
                serde_json::from_slice(payload)
                    .map_err(|e| format!("payload is not a user_logins row: {e}"))?
            };
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
