//! The outbox table as a [`Source`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::Pool;
use outbox_core::{AckSummary, Claimed, Delivery, Event, Source};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::claim::{PgClaim, Tid};
use crate::{PgConfig, PgError, ValidOutboxConfig};

/// Claims pending events of the outbox table in batches, lane by lane.
///
/// **Per-key order with many relays.** Every event has a lane, a hash of its
/// key (of its id when it has none). A claim first takes advisory locks on
/// up to [`OutboxConfig::lanes_per_claim`](crate::OutboxConfig::lanes_per_claim) lanes that have pending events,
/// or on every such lane once the relay has caught up (see there), with
/// session-level `pg_try_advisory_lock`s, released when the claim ends, so
/// relays skip each other's lanes instead of waiting. It then reads each
/// locked lane in `seq` order (`… WHERE lane = $l ORDER BY seq FOR UPDATE
/// SKIP LOCKED`, through the `(lane, seq)` index). A lane is therefore
/// worked by one claim at a time, in insertion order, and the next claim of
/// that lane starts only after the previous one committed or rolled back.
/// Plain `SKIP LOCKED` over the rows would let relay B publish event 2 of a
/// key while relay A still holds event 1. A dead relay's locks vanish with its connection; a relay that
/// hangs holding them is cut off by Postgres after
/// [`OutboxConfig::claim_timeout`](crate::OutboxConfig::claim_timeout). Lanes to try start at a rotating
/// position, so none starves.
///
/// The claim keeps its transaction open while the bus publishes. On
/// acknowledgement, in that same transaction, events the broker acknowledged
/// are deleted, events it rejected for good move to the dead-letter table
/// with their reason, and the others get their attempt count raised and stay
/// pending. A relay that dies at any point leaves its transaction to be
/// rolled back by the server: nothing is removed that was not acknowledged.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_core::Source;
/// use outbox_pg::{OutboxConfig, PgConfig, PgOutboxSource};
///
/// let config = PgConfig::default();
/// let source = PgOutboxSource::new(config.create_pool()?, config.target(), OutboxConfig::default().validate()?);
/// if let Some(batch) = source.claim(100).await? {
///     println!("claimed {}", batch.events.len());
/// }
/// # Ok(()) }
/// ```
pub struct PgOutboxSource {
    pool: Pool,
    target: String,
    config: ValidOutboxConfig,
    table: crate::SqlName,
    /// Resolved from the server at the first claim (see [`resolve_lock_namespace`]).
    lock_namespace: tokio::sync::OnceCell<i32>,
    rotation: AtomicUsize,
    /// Whether the last claim found fewer events than it asked for: the
    /// next one then takes every pending lane instead of `lanes_per_claim`.
    caught_up: AtomicBool,
    listener: Option<crate::notify::Listener>,
    channel: String,
    claim_sql: String,
    delete_sql: String,
    dead_letter_sql: String,
    release_sql: String,
}

impl PgOutboxSource {
    /// A source over the tables in `config`; `target` names the server in messages.
    pub fn new(pool: Pool, target: impl Into<String>, config: ValidOutboxConfig) -> Self {
        let table = config.table().clone();
        let dead = config.dead_letter_table().clone();
        let origin = table.plain().replace('\'', "");
        Self {
            pool,
            target: target.into(),
            table: table.clone(),
            lock_namespace: tokio::sync::OnceCell::new(),
            rotation: AtomicUsize::new(rotation_seed()),
            // Narrow at start: relays started together on a backlog must not
            // all lock every lane at once.
            caught_up: AtomicBool::new(false),
            listener: None,
            channel: crate::notify::channel_for(&table),
            // One statement, so one round trip: find the lanes with pending
            // events (a loose index scan over (lane, seq), one probe per
            // lane however many events there are); try to lock them from a
            // rotating start ($2) until $3 are locked; read each locked lane
            // on its own through the (lane, seq) index, in seq order, until
            // $4 events; unlock the lanes that gave none. The lock is tried
            // only on the rows the LIMIT takes, because it filters a scan of
            // a materialized CTE, directly under the LIMIT: in a subquery
            // with ORDER BY, Postgres pushed it below the sort, which locked
            // every pending lane and leaked the locks that LIMIT dropped
            // (`claims_leave_no_lane_locked`). The scalar subqueries run
            // once, and each reads `claimed` to its end first.
            //
            // One scan ordered by seq over all locked lanes would walk the
            // primary key through every deleted row not yet vacuumed: after
            // a 1M-event burst, 355 ms per claim instead of 1.3 ms. Ordering
            // by (lane, seq), the same order within one lane, is an order
            // only that index gives, so no statistics can make the planner
            // prefer the primary key with a lane filter instead.
            //
            // The result always has a row (its columns NULL when nothing
            // was claimed), so the release of unused lanes always runs: a
            // lane found pending whose rows were gone by the time it was
            // read would otherwise stay locked.
            //
            // An extension of an open claim passes the lanes it holds ($5)
            // with the last seq it took in each ($6): those lanes are read
            // past that seq (its own rows are locked by its own transaction,
            // which SKIP LOCKED does not skip), and are neither locked again
            // nor unlocked; other pending lanes are tried as by a new claim.
            // Held lanes leave the candidates before any lock is tried (in
            // `rotated`, materialized): a filter beside the lock call may be
            // evaluated after it, and the lock, taken a second time, would
            // outlive the claim (advisory locks count their holds).
            claim_sql: format!(
                "WITH RECURSIVE lanes AS ( \
                   (SELECT lane FROM {table} ORDER BY lane LIMIT 1) \
                   UNION ALL \
                   SELECT (SELECT o.lane FROM {table} o WHERE o.lane > lanes.lane ORDER BY o.lane LIMIT 1) \
                   FROM lanes WHERE lanes.lane IS NOT NULL), \
                 held AS MATERIALIZED ( \
                   SELECT h.l, h.w FROM unnest($5::int[], $6::bigint[]) AS h(l, w)), \
                 rotated AS MATERIALIZED ( \
                   SELECT lane AS l FROM ( \
                     SELECT lane, row_number() OVER (ORDER BY lane) - 1 AS i, count(*) OVER () AS n \
                     FROM lanes WHERE lane IS NOT NULL \
                     AND NOT EXISTS (SELECT 1 FROM held h WHERE h.l = lanes.lane)) p \
                   ORDER BY (i + $2::bigint % n) % n), \
                 locked AS MATERIALIZED ( \
                   SELECT l FROM rotated WHERE pg_try_advisory_lock($1::int, l) LIMIT $3::bigint), \
                 targets AS MATERIALIZED ( \
                   SELECT l, w FROM held \
                   UNION ALL SELECT l, (-9223372036854775808)::bigint FROM locked), \
                 claimed AS MATERIALIZED ( \
                   SELECT c.* FROM targets k CROSS JOIN LATERAL ( \
                     SELECT t.ctid, t.seq, t.event_id, t.topic, t.key, t.payload, t.headers, t.created_at, t.lane \
                     FROM {table} t WHERE t.lane = k.l AND t.seq > k.w \
                     ORDER BY t.lane, t.seq LIMIT $4::bigint FOR UPDATE OF t SKIP LOCKED) c \
                   LIMIT $4::bigint), \
                 unlocked AS MATERIALIZED ( \
                   SELECT pg_advisory_unlock($1::int, k.l) FROM locked k \
                   WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.lane = k.l)) \
                 SELECT c.*, u.n AS unlocked_lanes \
                 FROM (SELECT count(*) AS n FROM unlocked) u LEFT JOIN claimed c ON true"
            ),
            // Acknowledgements find each row at the address the claim read
            // (see `ACK_SETTINGS`); the seq guards against any other row.
            // The plain delete takes two arrays rather than a join on
            // unnest(), which cost 1.5 times as much.
            delete_sql: format!(
                "DELETE FROM {table} WHERE ctid = ANY($1::tid[]) AND seq = ANY($2::bigint[])"
            ),
            dead_letter_sql: format!(
                "WITH failed AS (SELECT * FROM unnest($1::tid[], $2::bigint[], $3::text[]) AS f(ctid, seq, reason)), \
                 moved AS (DELETE FROM {table} t USING failed f WHERE t.ctid = f.ctid AND t.seq = f.seq \
                           RETURNING t.event_id, t.topic, t.key, t.payload, t.headers, t.created_at, t.attempts, f.reason) \
                 INSERT INTO {dead} (event_id, topic, key, payload, headers, created_at, attempts, reason, origin) \
                 SELECT event_id, topic, key, payload, headers, created_at, attempts + 1, reason, '{origin}' FROM moved"
            ),
            release_sql: format!(
                "UPDATE {table} t SET attempts = t.attempts + 1, last_error = f.reason \
                 FROM unnest($1::tid[], $2::bigint[], $3::text[]) AS f(ctid, seq, reason) \
                 WHERE t.ctid = f.ctid AND t.seq = f.seq"
            ),
            config,
        }
    }

    /// The pool this source claims from.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Wakes the relay as soon as [`crate::Outbox::enqueue`] commits events
    /// (`LISTEN` on a connection of its own, to the server of `pg`), instead
    /// of at its next poll. Rows written by other means are still found by
    /// the poll. Must be called inside a Tokio runtime.
    pub fn listen_for_events(mut self, pg: PgConfig) -> Self {
        self.listener = Some(crate::notify::Listener::start(pg, self.channel.clone()));
        self
    }
}

/// The advisory-lock namespace of an outbox table's lanes: a stable hash of
/// the table's schema-qualified name as the server resolves it (through the
/// session's `search_path`), so that every spelling of one table (`outbox`,
/// `public.outbox`, `"public"."outbox"`) shares one namespace, and relays
/// configured differently still exclude each other, while two tables never
/// share lane locks.
pub(crate) async fn resolve_lock_namespace<C: deadpool_postgres::GenericClient + Sync>(
    client: &C,
    table: &crate::SqlName,
) -> Result<i32, PgError> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
            &[&table.to_string()],
        )
        .await
        .map_err(|e| PgError::query("outbox table lookup", e))?;
    let Some(row) = row else {
        return Err(PgError::Config(format!(
            "outbox table {} does not exist for this user's search_path (run `outbox migrate`)",
            table.plain()
        )));
    };
    let schema: String = row
        .try_get(0)
        .map_err(|e| PgError::query("outbox table lookup", e))?;
    let name: String = row
        .try_get(1)
        .map_err(|e| PgError::query("outbox table lookup", e))?;
    Ok(lock_namespace(&schema, &name))
}

/// The lane-lock namespace of the table `schema`.`name`.
pub(crate) fn lock_namespace(schema: &str, name: &str) -> i32 {
    let hash = crate::stable_hash(&format!("outbox-lanes:{schema}.{name}"));
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// A different starting lane per process, so relays started together do not
/// all try the same lanes first.
fn rotation_seed() -> usize {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize ^ std::process::id() as usize)
        .unwrap_or(0)
}

#[async_trait]
impl Source for PgOutboxSource {
    type Claim = PgClaim;

    /// A claim locks whole lanes and every event of a key is in its key's
    /// lane.
    fn claims_are_disjoint_by_key(&self) -> bool {
        true
    }

    async fn claim(&self, max_events: usize) -> outbox_core::Result<Option<Claimed<PgClaim>>> {
        let limit = i64::try_from(max_events).unwrap_or(i64::MAX);
        // Under a backlog a claim fills from its first lane or two anyway, and
        // locking few lanes leaves the others to other relays. Caught up, a
        // claim of few lanes would leave the events of every other lane
        // waiting for later claims: at 1,000 events/s over 64 lanes that was
        // most of the relay's latency.
        let lanes_limit = if self.caught_up.load(Ordering::Relaxed) {
            i64::MAX
        } else {
            i64::from(self.config.lanes_per_claim)
        };
        // Only its remainder modulo the number of pending lanes matters.
        let rotation = (self.rotation.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff) as i64;
        // Statistics lag behind a burst of deletes, and a bitmap or
        // sequential scan would then visit every dead row; the index scan
        // skips dead entries once marked.
        let namespace = *self
            .lock_namespace
            .get_or_try_init(|| async {
                let client = self
                    .pool
                    .get()
                    .await
                    .map_err(|e| crate::connect::pool_error(e, &self.target))?;
                resolve_lock_namespace(&client, &self.table).await
            })
            .await?;
        let no_lanes: Vec<i32> = Vec::new();
        let no_marks: Vec<i64> = Vec::new();
        let (mut claim, rows) = PgClaim::open(
            &self.pool,
            &self.target,
            self.config.claim_timeout,
            "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off",
            &self.claim_sql,
            &[
                &namespace,
                &rotation,
                &lanes_limit,
                &limit,
                &no_lanes,
                &no_marks,
            ],
        )
        .await?;
        claim.lock_namespace = namespace;
        let rows = claimed_rows(rows)?;
        if rows.is_empty() {
            // No lane had pending events, or their rows were taken by a
            // claim that just committed. This session holds no other
            // advisory locks: release them all, whatever the statement did.
            claim.release_all_lanes_and_rollback().await?;
            self.caught_up.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        self.caught_up
            .store(rows.len() < max_events, Ordering::Relaxed);
        let events = take_rows(&mut claim, &rows)?;
        Ok(Some(Claimed { events, claim }))
    }

    /// The claim's transaction is still open: the same claim statement,
    /// given the lanes it holds and the last seq it took in each, reads
    /// those lanes past it and locks whichever other lanes have pending
    /// events and are free. A lane is worked by one claim at a time (the
    /// lock) in seq order (the watermark), so each key's new events follow
    /// its events already in flight.
    async fn extend_claim(
        &self,
        claimed: &mut Claimed<PgClaim>,
        max_events: usize,
    ) -> outbox_core::Result<usize> {
        if max_events == 0 {
            return Ok(0);
        }
        let limit = i64::try_from(max_events).unwrap_or(i64::MAX);
        let rotation = (self.rotation.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff) as i64;
        let claim = &mut claimed.claim;
        let (lanes, marks): (Vec<i32>, Vec<i64>) = claim.watermarks.iter().unzip();
        let rows = claim
            .query(
                "claim (extend)",
                &self.claim_sql,
                &[
                    &claim.lock_namespace,
                    &rotation,
                    &i64::MAX,
                    &limit,
                    &lanes,
                    &marks,
                ],
            )
            .await?;
        let events = take_rows(claim, &claimed_rows(rows)?)?;
        let added = events.len();
        claimed.events.extend(events);
        Ok(added)
    }

    /// Only with [`PgOutboxSource::listen_for_events`]: without
    /// notifications an open claim would learn of new events only at the
    /// end of its window, and hold its lanes for nothing meanwhile.
    fn extends_claims(&self) -> bool {
        self.listener.is_some()
    }

    async fn wait_for_events(&self, timeout: std::time::Duration) -> outbox_core::Result<()> {
        match &self.listener {
            Some(listener) => listener.wait(timeout).await,
            None => tokio::time::sleep(timeout).await,
        }
        Ok(())
    }

    async fn acknowledge(
        &self,
        claimed: Claimed<PgClaim>,
        deliveries: &[Delivery],
    ) -> outbox_core::Result<AckSummary> {
        let claim = claimed.claim;
        let rows: Vec<(Tid, i64)> = claim
            .tids
            .iter()
            .copied()
            .zip(claim.ids.iter().copied())
            .collect();
        let plan = AckPlan::new(&rows, deliveries)?;
        let (tids, seqs) = split(&plan.completed);
        let params: [&(dyn ToSql + Sync); 2] = [&tids, &seqs];
        let client = claim.client()?;
        // Pipelined, and polled in this order (`biased`), so the settings
        // reach the server before the delete is planned.
        let (settings, deleted) = tokio::join!(
            biased;
            client.batch_execute(ACK_SETTINGS),
            claim.execute_for("acknowledge (delete)", &self.delete_sql, tids.len(), &params),
        );
        settings.map_err(|e| PgError::query("acknowledge (settings)", e))?;
        all_found("acknowledge (delete)", deleted?, tids.len())?;
        for (operation, sql, (rows, reasons)) in [
            (
                "acknowledge (dead-letter)",
                &self.dead_letter_sql,
                &plan.dead,
            ),
            ("acknowledge (release)", &self.release_sql, &plan.released),
        ] {
            let (tids, seqs) = split(rows);
            let changed = claim
                .execute_for(operation, sql, rows.len(), &[&tids, &seqs, reasons])
                .await?;
            all_found(operation, changed, rows.len())?;
        }
        claim.finish(true).await?;
        Ok(plan.summary())
    }
}

/// The rows of a claim statement that hold an event (the statement
/// answers one row of NULLs when it claimed nothing).
fn claimed_rows(rows: Vec<tokio_postgres::Row>) -> Result<Vec<tokio_postgres::Row>, PgError> {
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        let seq: Option<i64> = row
            .try_get("seq")
            .map_err(|e| PgError::query("claim (decode seq)", e))?;
        if seq.is_some() {
            claimed.push(row);
        }
    }
    Ok(claimed)
}

/// Decodes claimed rows into events in seq order, and records in `claim`
/// where each is (seq, ctid), the lanes it now holds and the last seq it
/// took in each.
fn take_rows(claim: &mut PgClaim, rows: &[tokio_postgres::Row]) -> Result<Vec<Event>, PgError> {
    let mut decoded = rows
        .iter()
        .map(|row| {
            let tid: Tid = row
                .try_get("ctid")
                .map_err(|e| PgError::query("claim (decode ctid)", e))?;
            let lane: i32 = row
                .try_get("lane")
                .map_err(|e| PgError::query("claim (decode lane)", e))?;
            decode_row(row).map(|(seq, event)| (seq, tid, lane, event))
        })
        .collect::<Result<Vec<_>, PgError>>()?;
    // Rows arrive lane after lane; in enqueue order they publish the way
    // they were written (each lane is in order either way).
    decoded.sort_unstable_by_key(|(seq, _, _, _)| *seq);
    let mut events = Vec::with_capacity(decoded.len());
    claim.ids.reserve(decoded.len());
    claim.tids.reserve(decoded.len());
    for (seq, tid, lane, event) in decoded {
        claim.ids.push(seq);
        claim.tids.push(tid);
        let mark = claim.watermarks.entry(lane).or_insert(seq);
        *mark = (*mark).max(seq);
        events.push(event);
    }
    claim.lanes = claim.watermarks.keys().copied().collect();
    Ok(events)
}

/// Statements of an acknowledgement find rows only through their `ctid`
/// (TID scans). Planned on statistics taken while the table was nearly
/// empty, which a busy outbox often is when autovacuum analyses it, a
/// `seq = ANY($1)` delete used to walk the whole `(lane, seq)` index, dead
/// entries included: claims took 80-190 ms instead of 10 ms for as long as
/// such statistics lasted. A TID scan costs the same whatever the statistics.
/// The claim query ran before these settings: it still uses its indexes.
const ACK_SETTINGS: &str = "SET LOCAL enable_indexscan = off; SET LOCAL enable_indexonlyscan = off";

fn split(rows: &[(Tid, i64)]) -> (Vec<Tid>, Vec<i64>) {
    rows.iter().copied().unzip()
}

/// An acknowledgement statement must find every row it was given where the
/// claim read it, since the claim still holds their locks. If one is
/// missing, something other than this claim changed the table; the error
/// drops the claim, so the transaction rolls back and its events stay
/// pending, to be published again (consumers skip the copies by event id).
fn all_found(operation: &'static str, found: u64, expected: usize) -> Result<(), PgError> {
    if found == expected as u64 {
        return Ok(());
    }
    Err(PgError::RowsMoved {
        operation,
        found,
        expected,
    })
}

/// How the rows of a claim split by delivery outcome.
pub(crate) struct AckPlan<T> {
    pub(crate) completed: Vec<T>,
    pub(crate) dead: (Vec<T>, Vec<String>),
    pub(crate) released: (Vec<T>, Vec<String>),
}

impl<T: Copy> AckPlan<T> {
    pub(crate) fn new(ids: &[T], deliveries: &[Delivery]) -> Result<Self, outbox_core::Error> {
        if ids.len() != deliveries.len() {
            return Err(outbox_core::Error::permanent(
                outbox_core::Stage::Bus,
                format!(
                    "bus returned {} deliveries for {} events; nothing was acknowledged",
                    deliveries.len(),
                    ids.len()
                ),
            ));
        }
        let mut plan = AckPlan {
            completed: Vec::new(),
            dead: (Vec::new(), Vec::new()),
            released: (Vec::new(), Vec::new()),
        };
        for (id, delivery) in ids.iter().zip(deliveries) {
            match delivery {
                Delivery::Acknowledged(_) => plan.completed.push(*id),
                Delivery::Rejected(reason) => {
                    plan.dead.0.push(*id);
                    plan.dead.1.push(reason.clone());
                }
                Delivery::Retryable(reason) => {
                    plan.released.0.push(*id);
                    plan.released.1.push(reason.clone());
                }
            }
        }
        Ok(plan)
    }

    pub(crate) fn summary(&self) -> AckSummary {
        AckSummary {
            completed: self.completed.len(),
            dead_lettered: self.dead.0.len(),
            released: self.released.0.len(),
        }
    }
}

fn decode_row(row: &tokio_postgres::Row) -> Result<(i64, Event), PgError> {
    let seq: i64 = row
        .try_get("seq")
        .map_err(|e| PgError::query("claim (decode seq)", e))?;
    let malformed = |reason: String| PgError::MalformedRow { seq, reason };
    let id: Uuid = row
        .try_get("event_id")
        .map_err(|e| malformed(e.to_string()))?;
    let topic: String = row.try_get("topic").map_err(|e| malformed(e.to_string()))?;
    let key: Option<Vec<u8>> = row.try_get("key").map_err(|e| malformed(e.to_string()))?;
    let payload: Vec<u8> = row
        .try_get("payload")
        .map_err(|e| malformed(e.to_string()))?;
    let headers: serde_json::Value = row
        .try_get("headers")
        .map_err(|e| malformed(e.to_string()))?;
    let created_at: SystemTime = row
        .try_get("created_at")
        .map_err(|e| malformed(e.to_string()))?;
    Ok((
        seq,
        Event {
            id,
            topic,
            key: key.map(Bytes::from),
            payload: Bytes::from(payload),
            headers: headers_from_json(headers),
            created_at,
        },
    ))
}

/// Headers are stored as a JSON object; non-string values keep their JSON text.
fn headers_from_json(value: serde_json::Value) -> BTreeMap<String, String> {
    match value {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}
