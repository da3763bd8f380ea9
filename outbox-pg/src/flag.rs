//! A business table with an "already sent" flag as a [`Source`] (the original demo).

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::Pool;
use outbox_core::{AckSummary, Claimed, Delivery, Event, Source};
use uuid::Uuid;

use crate::claim::PgClaim;
use crate::source::AckPlan;
use crate::{PgConfig, PgError, ValidFlagTableConfig};

/// Namespace of the deterministic event ids given to flag-table rows.
pub const FLAG_ROW_NAMESPACE: Uuid = Uuid::from_u128(0x6f75_7462_6f78_4000_8000_666c_6167_726f);

/// The event id of row `id` of `table`: the same on every publish of that
/// row, so a sink recognises a republished row.
///
/// ```
/// let a = outbox_pg::flag_row_event_id("user_logins", 1);
/// assert_eq!(a, outbox_pg::flag_row_event_id("user_logins", 1));
/// assert_ne!(a, outbox_pg::flag_row_event_id("user_logins", 2));
/// ```
pub fn flag_row_event_id(table: &str, id: i64) -> Uuid {
    Uuid::new_v5(&FLAG_ROW_NAMESPACE, format!("{table}/{id}").as_bytes())
}

/// Publishes rows of a business table whose flag column is false, and sets
/// the flag only after the broker acknowledged them.
///
/// Rows are claimed in id order, shared among relays by advisory locks, and
/// read under `FOR KEY SHARE SKIP LOCKED`, so a claim never holds up a
/// business update of its rows. A row that a business transaction holds
/// locked (`SELECT … FOR UPDATE`) waits, and so do the later rows of its
/// key: one key's rows reach the broker in id order. The payload is the row as a JSON object without
/// the flag column; the key is the text of the key column; the event id is
/// [`flag_row_event_id`]. A row the broker rejects for good is recorded in
/// the dead-letter table (origin = the table) and flagged, so it does not
/// block the rest.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_pg::{FlagTableConfig, FlagTableSource, PgConfig};
///
/// let pg = PgConfig::default();
/// let source = FlagTableSource::new(pg.create_pool()?, pg.target(), FlagTableConfig::default().validate()?);
/// # Ok(()) }
/// ```
pub struct FlagTableSource {
    pool: Pool,
    target: String,
    config: ValidFlagTableConfig,
    table_plain: String,
    claim_sql: String,
    mark_sql: String,
    dead_letter_sql: String,
    listener: Option<crate::notify::Listener>,
}

impl FlagTableSource {
    /// A source over the table in `config`.
    pub fn new(pool: Pool, target: impl Into<String>, config: ValidFlagTableConfig) -> Self {
        let table = &config.table_sql;
        let dead = &config.dead_letter_sql;
        let id = &config.id_sql;
        let flag = &config.flag_sql;
        let key_expr = match &config.key_sql {
            Some(key) => format!("t.{key}::text"),
            None => "NULL::text".to_string(),
        };
        // The rows are locked FOR KEY SHARE, which a business UPDATE does not
        // wait for (only deletes and key changes do), and shared among relays
        // by transaction-level advisory locks, tried only on the candidates
        // (a materialized CTE under the LIMIT). A row some business
        // transaction holds FOR UPDATE is skipped, and so is every later
        // candidate of its key: "blocked" is each key's first unflagged row
        // this claim did not lock, and nothing of a key is published from
        // there on, so a key's rows reach the broker in id order. The flag
        // name is passed as a parameter, never spliced as a string literal.
        let namespace = format!("hashtext('outbox-flag-rows:' || '{table}'::regclass::oid::text)");
        let candidates = format!(
            "candidates AS MATERIALIZED ( \
               SELECT t.{id}::bigint AS id, {key_expr} AS key, (to_jsonb(t) - $2::text)::text AS payload \
               FROM {table} t WHERE NOT t.{flag} ORDER BY t.{id} LIMIT $1 FOR KEY SHARE OF t SKIP LOCKED), \
             locked AS MATERIALIZED ( \
               SELECT * FROM candidates WHERE pg_try_advisory_xact_lock({namespace}, hashint8(id)))"
        );
        let claim_sql = match &config.key_sql {
            Some(key) => {
                format!(
                    "WITH {candidates}, \
                     blocked AS ( \
                       SELECT e.{key}::text AS key, min(e.{id}::bigint) AS first FROM {table} e \
                       WHERE NOT e.{flag} AND e.{id} <= (SELECT max(id) FROM locked) \
                         AND e.{id}::bigint NOT IN (SELECT id FROM locked) \
                       GROUP BY 1) \
                     SELECT l.id, l.key, l.payload FROM locked l LEFT JOIN blocked b ON b.key = l.key \
                     WHERE b.first IS NULL OR l.id < b.first ORDER BY l.id"
                )
            }
            None => format!("WITH {candidates} SELECT id, key, payload FROM locked ORDER BY id"),
        };
        let mark_sql = format!("UPDATE {table} SET {flag} = true WHERE {id} = ANY($1::bigint[])");
        let dead_letter_sql = format!(
            "WITH failed AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::uuid[]) AS f(id, reason, event_id)), \
             marked AS (UPDATE {table} t SET {flag} = true FROM failed f WHERE t.{id} = f.id \
                        RETURNING f.event_id, {key_expr} AS key, (to_jsonb(t) - $4::text)::text AS payload, f.reason) \
             INSERT INTO {dead} (event_id, topic, key, payload, headers, created_at, attempts, reason, origin) \
             SELECT event_id, $5::text, convert_to(key, 'UTF8'), convert_to(payload, 'UTF8'), '{{}}'::jsonb, now(), 1, reason, $6::text FROM marked"
        );
        Self {
            pool,
            target: target.into(),
            table_plain: table.plain(),
            claim_sql,
            mark_sql,
            dead_letter_sql,
            config,
            listener: None,
        }
    }

    /// Wakes the relay as soon as rows are inserted into the table (`LISTEN`
    /// on a connection of its own, to the server of `pg`), instead of at its
    /// next poll; the table needs the trigger of [`flag_notify_sql`] for it
    /// (without, the relay polls as before). Must be called inside a Tokio
    /// runtime.
    pub fn listen_for_events(mut self, pg: PgConfig) -> Self {
        let channel = crate::notify::channel_for(&self.config.table_sql);
        self.listener = Some(crate::notify::Listener::start(pg, channel));
        self
    }
}

/// The SQL that makes every `INSERT` into the flag table of `config` wake
/// the relays that [`FlagTableSource::listen_for_events`] at its commit: a
/// statement-level trigger `outbox_notify` on the table, calling the
/// function `outbox_flag_notify` (created in the first schema of the
/// `search_path`), which sends an empty `NOTIFY` on the table's channel.
/// PostgreSQL delivers it at the commit, once per transaction and channel,
/// so a business transaction pays one notification however many rows it
/// inserts. Idempotent; the table's other triggers are left alone. Rows
/// made pending again by an `UPDATE` of the flag are found by the poll.
/// Replacing the trigger locks the table exclusively for a moment, and two
/// sessions replacing the function at once may fail ("tuple concurrently
/// updated"): install it once, at deployment, not from every relay.
///
/// ```
/// use outbox_pg::{flag_notify_sql, FlagTableConfig};
///
/// let sql = flag_notify_sql(&FlagTableConfig::default().validate()?);
/// assert!(sql.contains("AFTER INSERT ON \"user_logins\" FOR EACH STATEMENT"));
/// # Ok::<(), outbox_pg::PgError>(())
/// ```
pub fn flag_notify_sql(config: &ValidFlagTableConfig) -> String {
    let table = &config.table_sql;
    // A string literal in the DDL: quotes doubled.
    let channel = crate::notify::channel_for(table).replace('\'', "''");
    format!(
        "CREATE OR REPLACE FUNCTION outbox_flag_notify() RETURNS trigger LANGUAGE plpgsql AS \
         $outbox$ BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $outbox$;\n\
         DROP TRIGGER IF EXISTS {FLAG_NOTIFY_TRIGGER} ON {table};\n\
         CREATE TRIGGER {FLAG_NOTIFY_TRIGGER} AFTER INSERT ON {table} FOR EACH STATEMENT \
         EXECUTE FUNCTION outbox_flag_notify('{channel}');"
    )
}

/// Whether the flag table of `config` has the trigger of
/// [`flag_notify_sql`] (`outbox_notify`): without it a relay finds new rows
/// only at its next poll. `false` when the table does not exist either.
pub async fn flag_notify_installed<C: deadpool_postgres::GenericClient + Sync>(
    client: &C,
    config: &ValidFlagTableConfig,
) -> Result<bool, PgError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger \
             WHERE tgrelid = to_regclass($1) AND tgname = $2 AND NOT tgisinternal)",
            &[&config.table_sql.to_string(), &FLAG_NOTIFY_TRIGGER],
        )
        .await
        .map_err(|e| PgError::query("look up the flag table's notify trigger", e))?;
    Ok(row.get(0))
}

/// The name of the trigger [`flag_notify_sql`] installs.
const FLAG_NOTIFY_TRIGGER: &str = "outbox_notify";

/// Runs [`flag_notify_sql`], as one transaction (the statements go in one
/// simple query, which PostgreSQL runs as a single transaction).
pub async fn install_flag_notify<C: deadpool_postgres::GenericClient + Sync>(
    client: &C,
    config: &ValidFlagTableConfig,
) -> Result<(), PgError> {
    client
        .batch_execute(&flag_notify_sql(config))
        .await
        .map_err(|e| PgError::query("install the flag table's notify trigger", e))
}

#[async_trait]
impl Source for FlagTableSource {
    type Claim = PgClaim;

    async fn wait_for_events(&self, timeout: std::time::Duration) -> outbox_core::Result<()> {
        match &self.listener {
            Some(listener) => listener.wait(timeout).await,
            None => tokio::time::sleep(timeout).await,
        }
        Ok(())
    }

    async fn claim(&self, max_events: usize) -> outbox_core::Result<Option<Claimed<PgClaim>>> {
        let limit = i64::try_from(max_events).unwrap_or(i64::MAX);
        let (mut claim, rows) = PgClaim::open(
            &self.pool,
            &self.target,
            self.config.claim_timeout,
            "",
            &self.claim_sql,
            &[&limit, &self.config.flag_column],
        )
        .await?;
        if rows.is_empty() {
            claim.finish(false).await?;
            return Ok(None);
        }
        let now = SystemTime::now();
        let mut events = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row
                .try_get("id")
                .map_err(|e| PgError::query("claim (decode id)", e))?;
            let key: Option<String> = row
                .try_get("key")
                .map_err(|e| PgError::query("claim (decode key)", e))?;
            let payload: String = row
                .try_get("payload")
                .map_err(|e| PgError::query("claim (decode payload)", e))?;
            let mut event = Event::new(self.config.topic.clone(), Bytes::from(payload))
                .with_id(flag_row_event_id(&self.table_plain, id))
                .with_created_at(now)
                .with_header("content-type", "application/json");
            if let Some(key) = key {
                event = event.with_key(key);
            }
            ids.push(id);
            events.push(event);
        }
        claim.ids = ids;
        Ok(Some(Claimed { events, claim }))
    }

    async fn acknowledge(
        &self,
        claimed: Claimed<PgClaim>,
        deliveries: &[Delivery],
    ) -> outbox_core::Result<AckSummary> {
        let claim = claimed.claim;
        let plan = AckPlan::new(&claim.ids, deliveries)?;
        claim
            .execute_for(
                "acknowledge (set flag)",
                &self.mark_sql,
                plan.completed.len(),
                &[&plan.completed],
            )
            .await?;
        let dead_ids: Vec<Uuid> = plan
            .dead
            .0
            .iter()
            .map(|id| flag_row_event_id(&self.table_plain, *id))
            .collect();
        claim
            .execute_for(
                "acknowledge (dead-letter)",
                &self.dead_letter_sql,
                plan.dead.0.len(),
                &[
                    &plan.dead.0,
                    &plan.dead.1,
                    &dead_ids,
                    &self.config.flag_column,
                    &self.config.topic,
                    &self.table_plain,
                ],
            )
            .await?;
        // Retryable rows keep their flag false and are claimed again.
        claim.finish(true).await?;
        Ok(plan.summary())
    }
}
