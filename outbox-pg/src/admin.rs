//! What operators ask of an outbox: how far behind it is, who works it, what
//! was dead-lettered, and putting dead letters back on the normal path.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::{PgError, ValidFlagTableConfig, ValidOutboxConfig};

/// Pending events of an outbox table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Events not yet acknowledged by the broker.
    pub pending: i64,
    /// How long the oldest of them has waited (`None` when nothing is pending).
    pub oldest_age: Option<Duration>,
}

/// Counts what waits in a source table and sets the backlog gauges: the
/// pending events of an outbox table, or the unsent rows of a flag table.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_pg::{BacklogProbe, FlagTableConfig, PgConfig};
///
/// let pool = PgConfig::default().create_pool()?;
/// let probe = BacklogProbe::flag_table(&FlagTableConfig::default().validate()?);
/// let backlog = probe.backlog(&pool.get().await?).await?;
/// println!("{} rows not sent yet", backlog.pending);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BacklogProbe {
    sql: String,
}

impl BacklogProbe {
    /// The pending events of an outbox table.
    pub fn outbox(config: &ValidOutboxConfig) -> Self {
        Self {
            sql: format!(
                "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM {}",
                config.table()
            ),
        }
    }

    /// The rows of a flag table whose flag is still false, aged by its
    /// `time_column` (the count alone without one). The count reads the
    /// partial index on unsent rows that the demo's schema has.
    pub fn flag_table(config: &ValidFlagTableConfig) -> Self {
        let age = match &config.time_sql {
            Some(time) => format!("EXTRACT(EPOCH FROM now() - min({time}))::float8"),
            None => "NULL::float8".to_string(),
        };
        Self {
            sql: format!(
                "SELECT count(*), {age} FROM {} WHERE NOT {}",
                config.table_sql, config.flag_sql
            ),
        }
    }

    /// Pending count and the oldest pending event's age (one scan).
    pub async fn backlog<C: GenericClient + Sync>(&self, client: &C) -> Result<Backlog, PgError> {
        let row = client
            .query_one(&self.sql, &[])
            .await
            .map_err(|e| PgError::query("backlog", e))?;
        let oldest: Option<f64> = get(&row, 1, "backlog")?;
        Ok(Backlog {
            pending: get(&row, 0, "backlog")?,
            oldest_age: oldest.map(seconds),
        })
    }

    /// [`BacklogProbe::backlog`], also set as the gauges
    /// `outbox_backlog_events` and `outbox_oldest_pending_age_seconds`
    /// (for a process that refreshes them every so often: each call scans
    /// the table once).
    pub async fn report<C: GenericClient + Sync>(&self, client: &C) -> Result<Backlog, PgError> {
        let backlog = self.backlog(client).await?;
        metrics::gauge!("outbox_backlog_events").set(backlog.pending as f64);
        metrics::gauge!("outbox_oldest_pending_age_seconds")
            .set(backlog.oldest_age.unwrap_or_default().as_secs_f64());
        Ok(backlog)
    }

    /// [`BacklogProbe::report`] every `interval` until `shutdown`, on a
    /// connection of `pool` taken for each round (for a relay that keeps the
    /// backlog gauges fresh; `target` names the database in errors). A
    /// failed round is logged and the next one tries again: the gauges only
    /// go stale, nothing else depends on them.
    pub async fn report_every(
        self,
        pool: deadpool_postgres::Pool,
        target: String,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        outbox_core::every(interval, shutdown, || async {
            let reported = match crate::connection(&pool, &target).await {
                Ok(client) => self.report(&client).await.map(drop),
                Err(err) => Err(err),
            };
            if let Err(err) = reported {
                tracing::debug!(error = %err, "backlog query failed");
            }
        })
        .await;
    }
}

/// One lane of an outbox table.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneStatus {
    /// The lane.
    pub lane: i32,
    /// Pending events in it.
    pub pending: i64,
    /// Age of its oldest pending event.
    pub oldest_age: Duration,
    /// Most publish attempts of one of its events (above 0: the broker refused
    /// or timed out on it before).
    pub max_attempts: i32,
    /// The relay session holding the lane right now, if a claim is in flight.
    pub owner: Option<LaneOwner>,
}

/// A database session holding a lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneOwner {
    /// Backend process id (`pg_stat_activity.pid`).
    pub pid: i32,
    /// `application_name` of the session (the relays set theirs).
    pub application_name: String,
    /// Client address, `local` for a Unix socket.
    pub client_addr: String,
}

/// A dead-lettered event.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Row id in the dead-letter table.
    pub id: i64,
    /// The event's id.
    pub event_id: Uuid,
    /// Its topic.
    pub topic: String,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its headers.
    pub headers: serde_json::Value,
    /// Publish attempts made.
    pub attempts: i32,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Which outbox table it came from.
    pub origin: String,
    /// When it was enqueued.
    pub created_at: std::time::SystemTime,
    /// When it was dead-lettered.
    pub dead_lettered_at: std::time::SystemTime,
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These row ids.
    Ids(Vec<i64>),
    /// Every dead letter of the table.
    All,
}

/// Queries and repairs of one outbox table and its dead-letter table.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_pg::{OutboxAdmin, OutboxConfig, PgConfig, Selection};
///
/// let pool = PgConfig::default().create_pool()?;
/// let client = pool.get().await?;
/// let admin = OutboxAdmin::new(&OutboxConfig::default().validate()?);
/// let backlog = admin.backlog(&client).await?;
/// println!("{} pending", backlog.pending);
/// for dead in admin.dead_letters(&client, 20).await? {
///     println!("{} {}: {}", dead.id, dead.topic, dead.reason);
/// }
/// let replayed = admin.replay(&client, &Selection::Ids(vec![1])).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct OutboxAdmin {
    backlog: BacklogProbe,
    lanes_sql: String,
    owners_sql: String,
    dead_counts_sql: String,
    dead_list_sql: String,
    dead_show_sql: String,
    replay_sql: String,
    replay_oldest_sql: String,
    pending_dead_sql: String,
    purge_sql: String,
    table: crate::SqlName,
    channel: String,
}

const DEAD_COLUMNS: &str = "id, event_id, topic, key, payload, headers, attempts, reason, origin, created_at, dead_lettered_at";

impl OutboxAdmin {
    /// The usual `interval` of [`OutboxAdmin::report_backlog_every`]: each
    /// round counts the pending events (one scan of the outbox table), so
    /// fresher gauges cost the database more.
    pub const REPORT_INTERVAL: Duration = Duration::from_secs(15);

    /// Queries over the tables of `config`.
    pub fn new(config: &ValidOutboxConfig) -> Self {
        let table = config.table();
        let dead = config.dead_letter_table();
        Self {
            backlog: BacklogProbe::outbox(config),
            lanes_sql: format!(
                "SELECT lane, count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8, max(attempts) \
                 FROM {table} GROUP BY lane ORDER BY lane"
            ),
            // Lane locks are advisory locks with two int4 keys: the
            // namespace shows as classid (as an unsigned oid), the lane as objid.
            owners_sql: "SELECT l.objid::bigint, a.pid, coalesce(a.application_name, ''), \
                          coalesce(host(a.client_addr), 'local') \
                          FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                          AND l.classid::bigint = $1"
                .into(),
            dead_counts_sql: format!(
                "SELECT reason, count(*) FROM {dead} GROUP BY reason ORDER BY count(*) DESC, reason LIMIT $1"
            ),
            dead_list_sql: format!("SELECT {DEAD_COLUMNS} FROM {dead} ORDER BY id LIMIT $1"),
            dead_show_sql: format!("SELECT {DEAD_COLUMNS} FROM {dead} WHERE id = $1"),
            // One statement: the events are back in the outbox exactly when
            // they leave the dead-letter table. They get new sequence
            // numbers, so each is published after whatever its key published
            // since it failed.
            replay_sql: format!(
                "WITH moved AS (DELETE FROM {dead} WHERE $2 OR id = ANY($1) RETURNING *) \
                 INSERT INTO {table} (event_id, topic, key, payload, headers, created_at) \
                 SELECT event_id, topic, key, payload, headers, created_at FROM moved ORDER BY id"
            ),
            replay_oldest_sql: format!(
                "WITH moved AS (DELETE FROM {dead} WHERE id IN \
                 (SELECT id FROM {dead} WHERE id <= $1 ORDER BY id LIMIT $2) RETURNING *) \
                 INSERT INTO {table} (event_id, topic, key, payload, headers, created_at) \
                 SELECT event_id, topic, key, payload, headers, created_at FROM moved ORDER BY id"
            ),
            pending_dead_sql: format!("SELECT max(id), count(*) FROM {dead}"),
            purge_sql: format!("DELETE FROM {dead} WHERE $2 OR id = ANY($1)"),
            table: table.clone(),
            channel: crate::notify::channel_for(table),
        }
    }

    /// [`OutboxAdmin::backlog`], also set as the gauges
    /// `outbox_backlog_events` and `outbox_oldest_pending_age_seconds`:
    /// see [`BacklogProbe::report`].
    pub async fn report_backlog<C: GenericClient + Sync>(
        &self,
        client: &C,
    ) -> Result<Backlog, PgError> {
        self.backlog.report(client).await
    }

    /// [`OutboxAdmin::report_backlog`] every `interval` until `shutdown`:
    /// see [`BacklogProbe::report_every`].
    pub async fn report_backlog_every(
        self,
        pool: deadpool_postgres::Pool,
        target: String,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        self.backlog
            .report_every(pool, target, interval, shutdown)
            .await;
    }

    /// Pending count and the oldest pending event's age (one scan of the table).
    pub async fn backlog<C: GenericClient + Sync>(&self, client: &C) -> Result<Backlog, PgError> {
        self.backlog.backlog(client).await
    }

    /// Every lane with pending events, with the relay session holding it now.
    pub async fn lanes<C: GenericClient + Sync>(
        &self,
        client: &C,
    ) -> Result<Vec<LaneStatus>, PgError> {
        let namespace = crate::source::resolve_lock_namespace(client, &self.table).await?;
        let lock_key = i64::from(u32::from_ne_bytes(namespace.to_ne_bytes()));
        let owners = client
            .query(&self.owners_sql, &[&lock_key])
            .await
            .map_err(|e| PgError::query("lane owners", e))?;
        let owners = owners
            .iter()
            .map(|row| {
                let lane: i64 = get(row, 0, "lane owners")?;
                let owner = LaneOwner {
                    pid: get(row, 1, "lane owners")?,
                    application_name: get(row, 2, "lane owners")?,
                    client_addr: get(row, 3, "lane owners")?,
                };
                Ok((lane, owner))
            })
            .collect::<Result<Vec<_>, PgError>>()?;
        let owner_of = |lane: i32| {
            owners
                .iter()
                .find(|(l, _)| *l == i64::from(lane))
                .map(|(_, owner)| owner.clone())
        };
        let rows = client
            .query(&self.lanes_sql, &[])
            .await
            .map_err(|e| PgError::query("lanes", e))?;
        rows.iter()
            .map(|row| {
                let lane: i32 = get(row, 0, "lanes")?;
                Ok(LaneStatus {
                    lane,
                    pending: get(row, 1, "lanes")?,
                    oldest_age: seconds(get(row, 2, "lanes")?),
                    max_attempts: get(row, 3, "lanes")?,
                    owner: owner_of(lane),
                })
            })
            .collect()
    }

    /// Dead letters counted by reason, most frequent first (at most `limit` reasons).
    pub async fn dead_letter_counts<C: GenericClient + Sync>(
        &self,
        client: &C,
        limit: i64,
    ) -> Result<Vec<(String, i64)>, PgError> {
        let rows = client
            .query(&self.dead_counts_sql, &[&limit])
            .await
            .map_err(|e| PgError::query("dead-letter counts", e))?;
        rows.iter()
            .map(|r| {
                Ok((
                    get(r, 0, "dead-letter counts")?,
                    get(r, 1, "dead-letter counts")?,
                ))
            })
            .collect()
    }

    /// The oldest `limit` dead letters.
    pub async fn dead_letters<C: GenericClient + Sync>(
        &self,
        client: &C,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, PgError> {
        let rows = client
            .query(&self.dead_list_sql, &[&limit])
            .await
            .map_err(|e| PgError::query("dead-letter list", e))?;
        rows.iter().map(dead_letter).collect()
    }

    /// One dead letter by row id.
    pub async fn dead_letter<C: GenericClient + Sync>(
        &self,
        client: &C,
        id: i64,
    ) -> Result<Option<DeadLetter>, PgError> {
        let row = client
            .query_opt(&self.dead_show_sql, &[&id])
            .await
            .map_err(|e| PgError::query("dead-letter show", e))?;
        row.as_ref().map(dead_letter).transpose()
    }

    /// Moves the selected dead letters back into the outbox, where relays
    /// publish them like any new event (same ids, so sinks that already
    /// hold one skip it), and wakes the relays. Returns how many moved.
    pub async fn replay<C: GenericClient + Sync>(
        &self,
        client: &C,
        selection: &Selection,
    ) -> Result<u64, PgError> {
        let (ids, all) = selection.params();
        let moved = client
            .execute(&self.replay_sql, &[&ids, &all])
            .await
            .map_err(|e| PgError::query("dead-letter replay", e))?;
        if moved > 0 {
            client
                .execute("SELECT pg_notify($1, '')", &[&self.channel])
                .await
                .map_err(|e| PgError::query("dead-letter replay (notify)", e))?;
        }
        Ok(moved)
    }

    /// The highest dead-letter row id and the number of dead letters now:
    /// the bound of a replay in batches ([`OutboxAdmin::replay_oldest`]),
    /// which must not chase the dead letters its own replays cause.
    pub async fn dead_letter_extent<C: GenericClient + Sync>(
        &self,
        client: &C,
    ) -> Result<(Option<i64>, i64), PgError> {
        let row = client
            .query_one(&self.pending_dead_sql, &[])
            .await
            .map_err(|e| PgError::query("dead letters", e))?;
        Ok((get(&row, 0, "dead letters")?, get(&row, 1, "dead letters")?))
    }

    /// Moves the oldest `limit` dead letters whose row id is at most
    /// `up_to` back into the outbox, in one statement (each batch is
    /// atomic, and batches keep the dead letters' order). Returns how many
    /// moved: 0 once none is left.
    pub async fn replay_oldest<C: GenericClient + Sync>(
        &self,
        client: &C,
        up_to: i64,
        limit: i64,
    ) -> Result<u64, PgError> {
        let moved = client
            .execute(&self.replay_oldest_sql, &[&up_to, &limit])
            .await
            .map_err(|e| PgError::query("dead-letter replay", e))?;
        if moved > 0 {
            client
                .execute("SELECT pg_notify($1, '')", &[&self.channel])
                .await
                .map_err(|e| PgError::query("dead-letter replay (notify)", e))?;
        }
        Ok(moved)
    }

    /// Deletes the selected dead letters for good. Returns how many.
    pub async fn purge<C: GenericClient + Sync>(
        &self,
        client: &C,
        selection: &Selection,
    ) -> Result<u64, PgError> {
        let (ids, all) = selection.params();
        client
            .execute(&self.purge_sql, &[&ids, &all])
            .await
            .map_err(|e| PgError::query("dead-letter purge", e))
    }
}

impl Selection {
    fn params(&self) -> (Vec<i64>, bool) {
        match self {
            Selection::Ids(ids) => (ids.clone(), false),
            Selection::All => (Vec::new(), true),
        }
    }
}

fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or_default()
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
    operation: &'static str,
) -> Result<T, PgError> {
    row.try_get(index).map_err(|e| PgError::query(operation, e))
}

fn dead_letter(row: &tokio_postgres::Row) -> Result<DeadLetter, PgError> {
    let op = "dead-letter read";
    Ok(DeadLetter {
        id: get(row, 0, op)?,
        event_id: get(row, 1, op)?,
        topic: get(row, 2, op)?,
        key: get(row, 3, op)?,
        payload: get(row, 4, op)?,
        headers: get(row, 5, op)?,
        attempts: get(row, 6, op)?,
        reason: get(row, 7, op)?,
        origin: get(row, 8, op)?,
        created_at: get(row, 9, op)?,
        dead_lettered_at: get(row, 10, op)?,
    })
}
