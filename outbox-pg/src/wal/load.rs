//! The initial load: the captured tables' rows, read in key order in
//! bounded chunks, each between two watermarks the stream carries
//! (`super::backfill` decides what of a chunk is published). It runs beside
//! the stream, on a pooled connection, and resumes after the last chunk
//! whose rows were acknowledged (`LoadState` in the progress table).

use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::backfill::{Key, LoadState, Snapshot, Watermark, LOAD_PREFIX};
use super::pgoutput::{Column, Datum, Relation};
use super::source::LoadProgress;
use super::WalConfig;
use crate::{PgError, SqlName};

fn query(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |e| PgError::query(operation, e)
}

/// Longest the loader waits, before its first chunk, for transactions
/// already committed to become visible (see [`Loader::settle`]).
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// A chunk read, handed to the reader before its high watermark is written.
pub(crate) struct Chunk {
    pub number: u64,
    pub relation: Relation,
    /// Each row's values, as the stream would send them (text).
    pub rows: Vec<Vec<Datum>>,
    /// Each row's key.
    pub keys: Vec<Key>,
    pub snapshot: Snapshot,
    /// The load's state once this chunk is published.
    pub mark: LoadState,
    /// Whether it is the load's last chunk.
    pub complete: bool,
    /// The reader's answer: the rows it published, or `None` when the
    /// chunk is to be read again.
    pub verdict: oneshot::Sender<Option<u64>>,
}

/// A captured table as the load reads it.
struct Table {
    sql_name: SqlName,
    relation: Relation,
    /// Key columns: positions in `relation.columns`, and their SQL types.
    key: Vec<(usize, String)>,
}

/// Reads the tables of `config` not yet loaded (`state`), chunk by chunk,
/// and hands each chunk to the reader (`chunks`) between its watermarks.
pub(crate) struct Loader {
    pool: Pool,
    config: WalConfig,
    run: Uuid,
    state: LoadState,
    chunks: mpsc::Sender<Chunk>,
    progress: watch::Sender<LoadProgress>,
}

impl Loader {
    pub(crate) fn new(
        pool: Pool,
        config: WalConfig,
        run: Uuid,
        state: LoadState,
        chunks: mpsc::Sender<Chunk>,
        progress: watch::Sender<LoadProgress>,
    ) -> Self {
        Self {
            pool,
            config,
            run,
            state,
            chunks,
            progress,
        }
    }

    /// Loads every table left; returns once the last chunk was published.
    pub(crate) async fn run(mut self) -> Result<(), PgError> {
        let mut db = self.pool.get().await.map_err(|e| PgError::Connect {
            target: "postgres (initial load)".into(),
            detail: e.to_string(),
            retryable: true,
        })?;
        let left: Vec<String> = self
            .config
            .tables
            .iter()
            .map(|t| t.qualified())
            .filter(|t| !self.state.done.contains(t))
            .collect();
        let estimated = estimate(&db, &left).await;
        self.progress.send_replace(LoadProgress {
            rows: 0,
            estimated,
            done: false,
        });
        if left.is_empty() {
            // Its tables were read whole (the configuration dropped the one
            // it was reading): nothing is left to publish.
            let progress = SqlName::parse(&self.config.progress_table)?;
            db.execute(
                &format!("UPDATE {progress} SET loaded = true WHERE slot = $1"),
                &[&self.config.slot],
            )
            .await
            .map_err(query("record the initial load"))?;
            self.progress.send_modify(|p| p.done = true);
            return Ok(());
        }
        settle(&db).await?;
        let mut chunk = 0u64;
        let mut again = 0u32;
        let mut rows_published = 0u64;
        for (i, name) in left.iter().enumerate() {
            let table = describe(&db, name).await?;
            let mut after = match &self.state.table {
                Some(current) if current == name => self.state.after.clone(),
                _ => None,
            };
            loop {
                chunk += 1;
                let mark = |high| Watermark {
                    slot: self.config.slot.clone(),
                    run: self.run,
                    chunk,
                    high,
                    table: name.clone(),
                    key: table
                        .key
                        .iter()
                        .map(|(at, _)| table.relation.columns[*at].name.clone())
                        .collect(),
                };
                emit(&db, &mark(false)).await?;
                let (snapshot, rows, keys) =
                    read_chunk(&mut db, &table, after.as_ref(), self.config.load_batch).await?;
                let table_done = rows.len() < self.config.load_batch;
                let last = keys.last().cloned().or_else(|| after.clone());
                let mut state = self.state.clone();
                if table_done {
                    state.done.push(name.clone());
                    state.table = None;
                    state.after = None;
                } else {
                    state.table = Some(name.clone());
                    state.after = last.clone();
                }
                let (verdict, answer) = oneshot::channel();
                let handed = self
                    .chunks
                    .send(Chunk {
                        number: chunk,
                        relation: table.relation.clone(),
                        rows,
                        keys,
                        snapshot,
                        mark: state.clone(),
                        complete: table_done && i + 1 == left.len(),
                        verdict,
                    })
                    .await;
                if handed.is_err() {
                    return Err(ended());
                }
                emit(&db, &mark(true)).await?;
                match answer.await {
                    Ok(Some(published)) => {
                        again = 0;
                        rows_published += published;
                        self.progress.send_modify(|p| p.rows = rows_published);
                        self.state = state;
                        after = last;
                        if table_done {
                            break;
                        }
                    }
                    Ok(None) => {
                        // Rare (a commit becoming visible as the chunk was
                        // read); a chunk that keeps coming back is said.
                        again += 1;
                        if again % 100 == 0 {
                            tracing::warn!(table = %name, times = again, "a chunk of the initial load keeps being read again: see the debug log for why");
                        }
                        tokio::time::sleep(Duration::from_millis(u64::from(again.min(100)))).await;
                    }
                    Err(_) => return Err(ended()),
                }
            }
        }
        self.progress.send_modify(|p| p.done = true);
        Ok(())
    }
}

fn ended() -> PgError {
    PgError::Replication {
        detail: "the stream ended during the initial load".into(),
        retryable: true,
    }
}

async fn emit(db: &tokio_postgres::Client, mark: &Watermark) -> Result<(), PgError> {
    db.execute(
        "SELECT pg_logical_emit_message(true, $1::text, $2::bytea)",
        &[&LOAD_PREFIX, &mark.to_bytes()],
    )
    .await
    .map_err(query("write a watermark of the initial load"))?;
    Ok(())
}

/// Waits until every transaction the server has committed is visible.
/// Within a session the reader checks each chunk against the commits it
/// streamed (`super::backfill`); a commit older than the session's stream,
/// still becoming visible, is what this covers.
async fn settle(db: &tokio_postgres::Client) -> Result<(), PgError> {
    let deadline = tokio::time::Instant::now() + SETTLE_LIMIT;
    let taken: String = db
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(query("take a snapshot for the initial load"))?
        .get(0);
    loop {
        let pending: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_snapshot_xip($1::text::pg_snapshot) x \
                 WHERE pg_xact_status(x) = 'committed' \
                   AND NOT pg_visible_in_snapshot(x, pg_current_snapshot())",
                &[&taken],
            )
            .await
            .map_err(query("wait for committed transactions to be visible"))?
            .get(0);
        if pending == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(pending, waited_s = SETTLE_LIMIT.as_secs(), "committed transactions still not visible; loading anyway (each chunk is still checked against the stream)");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The rows of `table` after `after` in key order, at most `limit`, with
/// the snapshot they were read in.
async fn read_chunk(
    db: &mut tokio_postgres::Client,
    table: &Table,
    after: Option<&Key>,
    limit: usize,
) -> Result<(Snapshot, Vec<Vec<Datum>>, Vec<Key>), PgError> {
    let columns: Vec<String> = table
        .relation
        .columns
        .iter()
        .map(|c| format!("{}::text", quote(&c.name)))
        .collect();
    // Qualified: a bare name in ORDER BY would be the text output column.
    let key_names: Vec<String> = table
        .key
        .iter()
        .map(|(at, _)| format!("src.{}", quote(&table.relation.columns[*at].name)))
        .collect();
    let filter = match after {
        None => String::new(),
        Some(_) => format!(
            "WHERE ({}) > ({})",
            key_names.join(", "),
            table
                .key
                .iter()
                .enumerate()
                .map(|(i, (_, ty))| format!("${}::text::{ty}", i + 1))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let sql = format!(
        "SELECT {} FROM {} AS src {filter} ORDER BY {} LIMIT {limit}",
        if columns.is_empty() {
            "1".to_string()
        } else {
            columns.join(", ")
        },
        table.sql_name,
        key_names.join(", "),
    );
    let params: Vec<Option<String>> = after.cloned().unwrap_or_default();
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    // A transaction object, not BEGIN and COMMIT statements: when the
    // session ends, this task is aborted wherever it is, and the object
    // rolls back before the connection goes back to the pool (which may be
    // the application's); a bare BEGIN would leave the next user of the
    // connection inside this read-only snapshot.
    let read = async {
        let tx = db
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        // The values' text output as the stream's, for this transaction only.
        tx.batch_execute(
            "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'; \
             SET LOCAL IntervalStyle = 'iso_8601'; SET LOCAL bytea_output = 'hex'; \
             SET LOCAL extra_float_digits = 3;",
        )
        .await?;
        let snapshot: String = tx
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await?
            .get(0);
        let rows = tx.query(&sql, &params).await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>((snapshot, rows))
    };
    let (snapshot, rows) = read
        .await
        .map_err(query("read a chunk of a captured table"))?;
    let snapshot = Snapshot::parse(&snapshot).map_err(|detail| PgError::Replication {
        detail,
        retryable: false,
    })?;
    let mut values = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    for row in &rows {
        let texts: Vec<Option<&str>> = (0..table.relation.columns.len())
            .map(|i| row.get::<_, Option<&str>>(i))
            .collect();
        keys.push(
            table
                .key
                .iter()
                .map(|(at, _)| texts[*at].map(str::to_string))
                .collect(),
        );
        values.push(
            texts
                .iter()
                .map(|text| match text {
                    Some(text) => Datum::Text(Bytes::copy_from_slice(text.as_bytes())),
                    None => Datum::Null,
                })
                .collect(),
        );
    }
    Ok((snapshot, values, keys))
}

/// The captured tables' rows as the statistics estimate them (0 when
/// unknown): the denominator of a progress display, never a limit.
async fn estimate(db: &tokio_postgres::Client, tables: &[String]) -> u64 {
    db.query_one(
        "SELECT coalesce(sum(greatest(reltuples, 0)), 0)::int8 FROM pg_class \
         WHERE oid = ANY($1::text[]::regclass[])",
        &[&tables],
    )
    .await
    .ok()
    .and_then(|row| row.try_get::<_, i64>(0).ok())
    .map_or(0, |n| u64::try_from(n).unwrap_or(0))
}

/// A name that is not a plain identifier, quoted for SQL.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The table's columns, as the stream would describe it, and the key it is
/// read in: the index of its replica identity (`REPLICA IDENTITY USING
/// INDEX`), else its primary key.
async fn describe(db: &tokio_postgres::Client, table: &str) -> Result<Table, PgError> {
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
    let relation = Relation {
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
    };
    let key_rows = db
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_index i ON i.indrelid = c.oid \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey) \
             WHERE n.nspname = $1 AND c.relname = $2 \
               AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&schema, &name],
        )
        .await
        .map_err(query("describe a captured table's key"))?;
    let mut key = Vec::new();
    for row in &key_rows {
        let column: String = row.get(0);
        let at = relation
            .columns
            .iter()
            .position(|c| c.name == column)
            .ok_or_else(|| PgError::Replication {
                detail: format!("the key column {column} of {table} is not among its columns"),
                retryable: true,
            })?;
        key.push((at, row.get::<_, String>(1)));
    }
    if key.is_empty() {
        return Err(PgError::Replication {
            detail: format!(
                "the initial load reads {table} in key order, and it has no primary key: add one \
                 (or REPLICA IDENTITY USING INDEX on a unique index), or capture it without a load \
                 (WalConfig::initial_load = false, --wal-no-initial-load)"
            ),
            retryable: false,
        });
    }
    Ok(Table {
        sql_name: SqlName::parse(table)?,
        relation,
        key,
    })
}
