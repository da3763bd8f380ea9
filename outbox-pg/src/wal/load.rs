//! The initial load: the captured tables' rows, read in the snapshot that
//! the slot exported when it was created, so that the stream from the
//! slot's consistent point continues exactly where the rows leave off.

use std::collections::VecDeque;

use bytes::Bytes;
use deadpool_postgres::{ClientWrapper, Pool};
use outbox_core::{system_time_to_ms, Event};

use super::change::Decoder;
use super::pgoutput::{Column, Datum, Relation};
use super::setup::load_lock;
use super::WalConfig;
use crate::{PgError, SqlName};

const CURSOR: &str = "outbox_wal_load";

fn query(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |e| PgError::query(operation, e)
}

/// Reads the captured tables in bounded batches, in one read-only
/// transaction on the exported snapshot (which holds the slot's load lock).
pub(crate) struct Loader {
    db: ClientWrapper,
    tables: VecDeque<String>,
    current: Option<Relation>,
    batch: i64,
    at: u64,
}

impl Loader {
    /// Takes the slot's load lock on a connection of its own (out of the
    /// pool: the lock lives as long as the connection, also when the load
    /// fails half-way), before the slot is created, so no other relay takes
    /// the half-loaded slot for abandoned.
    pub(crate) async fn lock(pool: &Pool, config: &WalConfig) -> Result<Self, PgError> {
        let pooled = pool.get().await.map_err(|e| PgError::Connect {
            target: "postgres (initial load)".into(),
            detail: e.to_string(),
            retryable: true,
        })?;
        let db = deadpool_postgres::Object::take(pooled);
        let locked: bool = db
            .query_one(
                "SELECT pg_try_advisory_lock($1)",
                &[&load_lock(&config.slot)],
            )
            .await
            .map_err(query("lock the initial load"))?
            .get(0);
        if !locked {
            return Err(PgError::Replication {
                detail: format!(
                    "another relay is loading the tables of slot {}",
                    config.slot
                ),
                retryable: true,
            });
        }
        Ok(Self {
            db,
            tables: config.tables.iter().map(|t| t.qualified()).collect(),
            current: None,
            batch: i64::try_from(config.load_batch).unwrap_or(i64::MAX),
            at: 0,
        })
    }

    /// Opens the snapshot `snapshot` (as `CREATE_REPLICATION_SLOT …
    /// EXPORT_SNAPSHOT` named it), taken at the slot's consistent point `at`.
    pub(crate) async fn begin(&mut self, snapshot: &str, at: u64) -> Result<(), PgError> {
        if snapshot.is_empty() || !snapshot.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(PgError::Replication {
                detail: format!(
                    "the server exported the snapshot {snapshot:?}, not a snapshot name"
                ),
                retryable: false,
            });
        }
        self.at = at;
        // The session's text output is the one the stream's values are read in.
        self.db
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
                 SET TRANSACTION SNAPSHOT '{snapshot}';
                 SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO';
                 SET LOCAL IntervalStyle = 'iso_8601'; SET LOCAL bytea_output = 'hex';
                 SET LOCAL extra_float_digits = 3;"
            ))
            .await
            .map_err(query("open the initial load's snapshot"))?;
        Ok(())
    }

    /// The captured tables' rows as the statistics estimate them (0 when
    /// unknown): the denominator of a progress display, never a limit.
    pub(crate) async fn estimate(&self) -> u64 {
        let tables: Vec<String> = self.tables.iter().cloned().collect();
        self.db
            .query_one(
                "SELECT coalesce(sum(greatest(reltuples, 0)), 0)::int8 FROM pg_class \
                 WHERE oid = ANY($1::text[]::regclass[])",
                &[&tables],
            )
            .await
            .ok()
            .and_then(|row| row.try_get::<_, i64>(0).ok())
            .map_or(0, |n| u64::try_from(n).unwrap_or(0))
    }

    /// The next batch of rows as events (`op` `r`); `None` once every table
    /// was read (the snapshot's transaction is then ended).
    pub(crate) async fn next(&mut self, decoder: &Decoder) -> Result<Option<Vec<Event>>, PgError> {
        loop {
            let Some(relation) = &self.current else {
                let Some(table) = self.tables.pop_front() else {
                    self.db
                        .batch_execute("COMMIT")
                        .await
                        .map_err(query("end the initial load"))?;
                    let _ = self
                        .db
                        .execute("SELECT pg_advisory_unlock_all()", &[])
                        .await;
                    return Ok(None);
                };
                let relation = describe(&self.db, &table).await?;
                let columns: Vec<String> = relation
                    .columns
                    .iter()
                    .map(|c| format!("{}::text", quote(&c.name)))
                    .collect();
                let name = SqlName::parse(&table)?;
                self.db
                    .batch_execute(&format!(
                        "DECLARE {CURSOR} NO SCROLL CURSOR FOR SELECT {} FROM {name}",
                        if columns.is_empty() {
                            "1".to_string()
                        } else {
                            columns.join(", ")
                        }
                    ))
                    .await
                    .map_err(query("read a captured table"))?;
                self.current = Some(relation);
                continue;
            };
            let rows = self
                .db
                .query(&format!("FETCH {} FROM {CURSOR}", self.batch), &[])
                .await
                .map_err(query("read a captured table"))?;
            if rows.is_empty() {
                self.db
                    .batch_execute(&format!("CLOSE {CURSOR}"))
                    .await
                    .map_err(query("read a captured table"))?;
                self.current = None;
                continue;
            }
            let now_ms = system_time_to_ms(std::time::SystemTime::now());
            let events = rows
                .iter()
                .map(|row| {
                    let datums: Vec<Datum> = (0..relation.columns.len())
                        .map(|i| match row.get::<_, Option<&str>>(i) {
                            Some(text) => Datum::Text(Bytes::copy_from_slice(text.as_bytes())),
                            None => Datum::Null,
                        })
                        .collect();
                    decoder.snapshot_row(relation, &datums, self.at, now_ms)
                })
                .collect();
            return Ok(Some(events));
        }
    }
}

/// A name that is not a plain identifier, quoted for SQL.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The table's columns and primary key, as the stream would describe it.
async fn describe(db: &tokio_postgres::Client, table: &str) -> Result<Relation, PgError> {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let rows = db
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisprimary \
                            AND a.attnum = ANY (i.indkey)) \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await
        .map_err(query("describe a captured table"))?;
    if rows.is_empty() {
        return Err(PgError::Replication {
            detail: format!("the captured table {table} does not exist"),
            retryable: false,
        });
    }
    Ok(Relation {
        oid: 0,
        schema: schema.to_string(),
        table: name.to_string(),
        replica_identity: b'd',
        columns: rows
            .iter()
            .map(|row| Column {
                name: row.get(0),
                type_oid: u32::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                type_modifier: row.get(2),
                key: row.get(3),
            })
            .collect(),
    })
}
