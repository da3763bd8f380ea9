//! The reader task of a [`WalSource`](super::WalSource): one replication
//! session after another, each streaming the slot from its confirmed
//! position into the source's queue (and, while an initial load runs, its
//! chunks between their watermarks), and confirming what the relay
//! acknowledged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use outbox_core::{system_time_to_ms, Event};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::backfill::{Backfill, Decision, LOAD_PREFIX};
use super::change::{lsn_text, Decoded, Decoder, Routing};
use super::client::{ClientError, Connection, Replicated, Start};
use super::load::{Chunk, Loader};
use super::pgoutput::{boundary, Boundary};
use super::source::{insert_dead_letters, Item, LoadMark, Shared};
use super::stream::{Assembler, StreamError};
use super::WalConfig;
use crate::{PgConfig, PgError, SqlName};

/// Session settings that make the server's text output of values the one
/// `value::to_json` reads.
const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=iso_8601 \
                               -c bytea_output=hex -c extra_float_digits=3";

/// How many status intervals between two readings of the slot's gauges.
const SLOT_REPORT_TICKS: u64 = 5;

/// The least an idle stream's confirmed position moves at a time (bytes of
/// WAL): far below a WAL segment (16 MiB), so an idle capture still pins
/// none, and far above the record of one position.
const IDLE_CONFIRM_STEP: u64 = 64 * 1024;

/// Why a session ended.
enum Ended {
    /// An acknowledgement asked to read again from the confirmed position.
    Rewind,
    /// The stream's protocol must change: read again from the confirmed
    /// position in a new session.
    Reconnect,
    /// The relay is stopping.
    Stopped,
}

/// The task behind a `WalSource`: its sessions, one after another, until
/// the source is dropped or fails for good.
pub(super) struct Reader {
    pub(super) shared: Arc<Shared>,
    pub(super) pg: PgConfig,
    pub(super) pool: Pool,
    pub(super) config: WalConfig,
    pub(super) dead_letter: SqlName,
    pub(super) stop: CancellationToken,
    /// Sessions read with protocol 1 until the confirmed position reaches
    /// this (0: no limit): the end of a streamed transaction whose
    /// messages could not be attributed (`StreamError::Unattributable`).
    pub(super) unstreamed_until: std::sync::atomic::AtomicU64,
}

impl Reader {
    pub(super) async fn run(self) {
        let mut backoff =
            outbox_core::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut waiting_since: Option<Instant> = None;
        loop {
            let result = self.session(&mut waiting_since).await;
            match result {
                Ok(Ended::Stopped) => return,
                Ok(Ended::Rewind) => {
                    debug!(slot = %self.config.slot, "WAL stream starts over from the confirmed position");
                    backoff.reset();
                }
                Ok(Ended::Reconnect) => backoff.reset(),
                Err(SessionError::Held(holder)) => {
                    if waiting_since.is_none() {
                        info!(slot = %self.config.slot, holder = %holder,
                              "the replication slot is streamed by another relay: this one waits to take over");
                        waiting_since = Some(Instant::now());
                    }
                    if self.pause(self.config.standby_retry).await {
                        return;
                    }
                }
                Err(SessionError::Failed(err)) if err.is_retryable() => {
                    let delay = backoff.next_delay();
                    warn!(slot = %self.config.slot, error = %err, retry_in_ms = delay.as_millis() as u64,
                          "WAL stream interrupted; reading again from the confirmed position");
                    if self.pause(delay).await {
                        return;
                    }
                }
                Err(SessionError::Failed(err)) => {
                    tracing::error!(slot = %self.config.slot, error = %err, "WAL source stopped");
                    *self.shared.fatal.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(err.to_string());
                    self.shared.arrived.notify_waiters();
                    return;
                }
            }
        }
    }

    /// Sleeps `delay`; true when the relay is stopping.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }

    async fn session(&self, waiting_since: &mut Option<Instant>) -> Result<Ended, SessionError> {
        self.shared
            .caught_up
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let prepared = self.prepare().await?;
        // Everything from the last session is gone: read from the slot's position on.
        let generation = {
            let mut queue = self.shared.lock();
            queue.items.clear();
            queue.outstanding = 0;
            queue.generation
        };
        let start = prepared.at;
        self.shared.advance(start);
        let mut client = Connection::connect(
            &self.pg,
            &self.session_options(),
            &format!("{}-wal", self.pg.application_name),
        )
        .await
        .map_err(classify)?;
        let system = client.identify_system().await.map_err(classify)?;
        let unstreamed_until = self
            .unstreamed_until
            .load(std::sync::atomic::Ordering::SeqCst);
        let streaming = client
            .start(&Start {
                slot: &self.config.slot,
                publication: &self.config.publication,
                from: start,
                stream_in_progress: self.config.stream_in_progress && unstreamed_until == 0,
            })
            .await
            .map_err(classify)?;
        let mut assembler = Assembler::new(
            self.config.in_progress_memory,
            self.config
                .spill_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir),
            self.shared.streamed.clone(),
            vec![self.config.message_prefix.clone(), LOAD_PREFIX.to_string()],
        );
        self.shared
            .streamed
            .active
            .store(streaming, std::sync::atomic::Ordering::SeqCst);
        if let Some(since) = waiting_since.take() {
            info!(slot = %self.config.slot, waited_ms = since.elapsed().as_millis() as u64,
                  "took over the replication slot");
        }
        info!(slot = %self.config.slot, from = %lsn_text(start), in_progress_transactions = streaming,
              "streaming the write-ahead log");
        let mut decoder = Decoder::new(system.system_id.clone(), self.routing());
        // An unfinished initial load runs beside the stream, which checks
        // its chunks against the changes between their watermarks.
        let mut load = prepared.load.map(|state| {
            let run = Uuid::new_v4();
            let (chunks, handed) = tokio::sync::mpsc::channel(1);
            let loader = Loader::new(
                self.pool.clone(),
                self.config.clone(),
                run,
                state,
                chunks,
                self.shared.load.clone(),
            );
            info!(slot = %self.config.slot, "loading the captured tables beside the stream");
            LoadRun {
                backfill: Backfill::new(&self.config.slot, run),
                handed,
                task: AbortOnDrop(tokio::spawn(loader.run())),
            }
        });
        // The server's WAL end when the session began: the stream has read
        // what was there once it reports a position at or past it.
        let catch_up_to = system.xlogpos;
        let mut rewind = self.shared.rewind.subscribe();
        let mut confirm = self.shared.confirm.subscribe();
        let mut sent = start;
        let mut events_in_transaction = 0usize;
        let mut tick = tokio::time::interval(self.config.status_interval);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    // The last position, read by the server before the
                    // stream ends: a clean stop re-reads nothing.
                    self.send_confirmed(&mut client, &mut sent).await?;
                    client.stop().await;
                    return Ok(Ended::Stopped);
                }
                _ = rewind.changed() => return Ok(Ended::Rewind),
                _ = tick.tick() => {
                    self.send_confirmed(&mut client, &mut sent).await?;
                    if unstreamed_until != 0 && sent >= unstreamed_until {
                        self.unstreamed_until.store(0, std::sync::atomic::Ordering::SeqCst);
                        info!(slot = %self.config.slot, "past the transaction read unstreamed: streaming large transactions again");
                        client.stop().await;
                        return Ok(Ended::Reconnect);
                    }
                    ticks += 1;
                    if ticks % SLOT_REPORT_TICKS == 1 {
                        self.report_slot(&assembler).await;
                    }
                }
                _ = confirm.changed() => {}
                ended = async {
                    match load.as_mut() {
                        Some(run) => (&mut run.task.0).await,
                        None => std::future::pending().await,
                    }
                } => {
                    match ended {
                        Ok(Ok(())) => {
                            info!(slot = %self.config.slot, "initial load read");
                            load = None;
                            decoder.watch(None);
                        }
                        Ok(Err(err)) => return Err(SessionError::Failed(err)),
                        Err(panic) => {
                            return Err(SessionError::Failed(PgError::Replication {
                                detail: format!("the initial load's task failed: {panic}"),
                                retryable: true,
                            }))
                        }
                    }
                }
                received = client.recv() => {
                    let Some(replicated) = received.map_err(classify)? else {
                        return Err(SessionError::Failed(PgError::Replication {
                            detail: "the server ended the replication stream".into(),
                            retryable: true,
                        }));
                    };
                    let data = match replicated {
                        Replicated::XLogData { data } => data,
                        Replicated::KeepAlive { wal_end, reply } => {
                            if reply {
                                self.send_confirmed(&mut client, &mut sent).await?;
                            }
                            if !decoder.in_transaction() {
                                self.confirm_if_idle(wal_end, generation);
                                // Not while a load runs: its chunks are pending too.
                                if wal_end >= catch_up_to
                                    && load.is_none()
                                    && !self.shared.caught_up.swap(true, std::sync::atomic::Ordering::SeqCst)
                                {
                                    self.shared.arrived.notify_waiters();
                                }
                            }
                            continue;
                        }
                    };
                    let mut released = match assembler.feed(data) {
                        Ok(released) => released,
                        Err(StreamError::Unattributable { xid, end_lsn }) => {
                            warn!(slot = %self.config.slot, xid, end = %lsn_text(end_lsn),
                                  "a streamed transaction has logical messages and a rolled back savepoint, which \
                                   pgoutput does not tell apart: reading it again unstreamed (docs/wal.md)");
                            self.unstreamed_until.store(end_lsn, std::sync::atomic::Ordering::SeqCst);
                            client.stop().await;
                            return Ok(Ended::Reconnect);
                        }
                        Err(err) => return Err(stream_failed(err)),
                    };
                    while let Some(message) = released.next().map_err(|e| stream_failed(assembler.spill_error(e)))? {
                        let undecodable = |e: &dyn std::fmt::Display| SessionError::Failed(PgError::Replication {
                            detail: format!("cannot decode the replication stream: {e}"),
                            retryable: false,
                        });
                        match boundary(&message).map_err(|e| undecodable(&e))? {
                            Boundary::Begin { final_lsn, commit_time_micros, xid } => {
                                decoder.begin(final_lsn, commit_time_micros, xid);
                                events_in_transaction = 0;
                            }
                            Boundary::Other => {
                                let decoded = decoder.row(&message).map_err(|e| undecodable(&e))?;
                                if let Some(run) = load.as_mut() {
                                    run.backfill.touched(decoder.take_touched());
                                }
                                if self.take(decoded, generation, &mut client, &mut sent).await? {
                                    events_in_transaction += 1;
                                }
                            }
                            Boundary::Message { prefix, content, .. } if prefix == LOAD_PREFIX => {
                                let Some(run) = load.as_mut() else { continue };
                                let Some(mark) = run.backfill.ours(&content) else { continue };
                                if !mark.high {
                                    run.backfill.open(&mark);
                                    decoder.watch(run.backfill.watched());
                                    continue;
                                }
                                decoder.watch(None);
                                // Handed over before the loader wrote this mark.
                                let Some(chunk) = run.handed.recv().await else { continue };
                                if chunk.number != mark.chunk {
                                    let _ = chunk.verdict.send(None);
                                    continue;
                                }
                                let at = decoder.commit_lsn().unwrap_or_default();
                                let published = self.publish_chunk(&mut run.backfill, &decoder, chunk, at, generation, &mut client, &mut sent).await?;
                                events_in_transaction += published;
                            }
                            Boundary::Message { prefix, content, lsn, transactional } => {
                                let decoded = decoder.message(&prefix, &content, lsn);
                                if self.take(decoded, generation, &mut client, &mut sent).await? {
                                    events_in_transaction += 1;
                                    if !transactional {
                                        self.push(Item::Commit(lsn), generation);
                                    }
                                }
                            }
                            Boundary::Commit { end_lsn } => {
                                if let (Some(run), Some((xid, changed))) = (load.as_mut(), decoder.transaction()) {
                                    run.backfill.committed(xid, changed);
                                }
                                decoder.commit();
                                if events_in_transaction > 0 {
                                    self.push(Item::Commit(end_lsn), generation);
                                } else {
                                    self.confirm_if_idle(end_lsn, generation);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// A chunk of the initial load at its high watermark (in the
    /// transaction committing at `at`): queues the rows no change in its
    /// window touched, then its load mark, and tells the loader; or tells
    /// it to read the chunk again. Returns the items queued.
    #[allow(clippy::too_many_arguments)]
    async fn publish_chunk(
        &self,
        backfill: &mut Backfill,
        decoder: &Decoder,
        chunk: Chunk,
        at: u64,
        generation: u64,
        client: &mut Connection,
        sent: &mut u64,
    ) -> Result<usize, SessionError> {
        let keep = match backfill.close(chunk.number, &chunk.keys, &chunk.snapshot) {
            Decision::Publish(keep) => keep,
            Decision::Redo(why) => {
                debug!(slot = %self.config.slot, chunk = chunk.number, why = %why, "initial load: reading a chunk again");
                let _ = chunk.verdict.send(None);
                return Ok(0);
            }
        };
        debug!(slot = %self.config.slot, chunk = chunk.number, read = chunk.rows.len(), publish = keep.len(),
               first = ?chunk.keys.first(), last = ?chunk.keys.last(), "initial load: a chunk at its high watermark");
        let now_ms = system_time_to_ms(std::time::SystemTime::now());
        let mut queued = 0;
        for i in keep {
            let Some(row) = chunk.rows.get(i) else {
                continue;
            };
            let event = decoder.snapshot_row(&chunk.relation, row, at, now_ms);
            if !self
                .take(Decoded::Event(event), generation, client, sent)
                .await?
            {
                // A rewind or a stop: the session ends, the loader with it.
                return Ok(queued);
            }
            queued += 1;
        }
        self.push(
            Item::LoadMark(LoadMark {
                state: chunk.mark,
                complete: chunk.complete,
            }),
            generation,
        );
        let _ = chunk.verdict.send(Some(queued as u64));
        // The mark counts as an item of the transaction: its end is queued
        // after it, so the position moves past the chunk once it is settled.
        Ok(queued + 1)
    }

    /// Confirms `lsn` when no event is queued or in flight: an idle capture
    /// (or one whose tables are quiet) then pins no WAL. Not after a rewind
    /// this session has not seen yet: the emptied queue says nothing about
    /// the events it dropped, which this session's position is past.
    ///
    /// Only a step of at least [`IDLE_CONFIRM_STEP`]: recording a position
    /// writes WAL itself, which the next keepalive reports, so confirming
    /// every idle keepalive would write forever on a server with nothing
    /// to capture.
    fn confirm_if_idle(&self, lsn: u64, generation: u64) {
        if lsn
            < self
                .shared
                .confirm
                .borrow()
                .saturating_add(IDLE_CONFIRM_STEP)
        {
            return;
        }
        let queue = self.shared.lock();
        if queue.generation == generation && queue.outstanding == 0 && queue.items.is_empty() {
            self.shared.advance(lsn);
        }
    }

    /// Records and sends the confirmed position when it moved: the record
    /// first, so it is never behind the slot (how a slot created again is
    /// recognised).
    async fn send_confirmed(
        &self,
        client: &mut Connection,
        sent: &mut u64,
    ) -> Result<(), SessionError> {
        let target = *self.shared.confirm.borrow();
        if target <= *sent {
            // Still a status: the server ends a session silent for
            // wal_sender_timeout.
            return client.send_status(*sent).await.map_err(classify);
        }
        let db = self.connection().await?;
        let table = SqlName::parse(&self.config.progress_table).map_err(SessionError::Failed)?;
        db.execute(
            // Never backwards: a relay that was stopped, woke after another
            // took the slot over and confirmed further, must not make the
            // slot look ahead of the record (a re-created slot).
            &format!(
                "UPDATE {table} SET confirmed_lsn = greatest(confirmed_lsn, $2::text::pg_lsn), \
                 updated_at = now() WHERE slot = $1"
            ),
            &[&self.config.slot, &lsn_text(target)],
        )
        .await
        .map_err(|e| SessionError::Failed(PgError::query("record the WAL position", e)))?;
        client.send_status(target).await.map_err(classify)?;
        *sent = target;
        Ok(())
    }

    /// Sets the slot's gauges: WAL the server keeps for it, and WAL written
    /// since its confirmed position. A failed reading is skipped: the
    /// stream does not depend on it.
    async fn report_slot(&self, assembler: &Assembler) {
        let slot = self.config.slot.clone();
        metrics::gauge!("outbox_wal_in_progress_bytes", "slot" => slot.clone())
            .set(assembler.in_memory() as f64);
        metrics::counter!("outbox_wal_spilled_bytes_total", "slot" => slot).absolute(
            self.shared
                .streamed
                .spilled
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let Ok(db) = self.pool.get().await else {
            return;
        };
        let row = db
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8, \
                        pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.config.slot],
            )
            .await;
        if let Ok(Some(row)) = row {
            let retained: Option<f64> = row.get(0);
            let behind: Option<f64> = row.get(1);
            let slot = self.config.slot.clone();
            metrics::gauge!("outbox_wal_retained_bytes", "slot" => slot.clone())
                .set(retained.unwrap_or(0.0));
            metrics::gauge!("outbox_wal_unconfirmed_bytes", "slot" => slot)
                .set(behind.unwrap_or(0.0));
        }
        let queued = self.shared.lock().items.len();
        metrics::gauge!("outbox_wal_queued_events", "slot" => self.config.slot.clone())
            .set(queued as f64);
    }

    /// Queues what the decoder made; true when it was an event. While the
    /// queue is full (a slow broker), it still sends a status every status
    /// interval: the server ends a session silent for `wal_sender_timeout`
    /// (it reads replies while its own output waits), and acknowledgements
    /// made meanwhile are confirmed.
    async fn take(
        &self,
        decoded: Decoded,
        generation: u64,
        client: &mut Connection,
        sent: &mut u64,
    ) -> Result<bool, SessionError> {
        match decoded {
            Decoded::Nothing => Ok(false),
            Decoded::Truncated(tables) => {
                warn!(tables = ?tables, "tables were truncated: a truncate is not captured as events (docs/wal.md)");
                Ok(false)
            }
            Decoded::Poison {
                id,
                content,
                reason,
            } => {
                let event = Event::new("", content).with_id(id);
                warn!(event_id = %id, reason = %reason, "a logical message under the outbox prefix is not an event: dead-lettered");
                let db = self.connection().await?;
                insert_dead_letters(&db, &self.dead_letter, &[(&event, reason.as_str())])
                    .await
                    .map_err(SessionError::Failed)?;
                Ok(false)
            }
            Decoded::Event(event) => {
                // Bounded read-ahead: wait for the relay to take some.
                loop {
                    let space = self.shared.space.notified();
                    tokio::pin!(space);
                    space.as_mut().enable();
                    {
                        let queue = self.shared.lock();
                        if queue.generation != generation {
                            return Ok(false);
                        }
                        if queue.items.len() < self.config.read_ahead {
                            break;
                        }
                    }
                    tokio::select! {
                        _ = space => {}
                        _ = self.stop.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(self.config.status_interval) => {
                            self.send_confirmed(client, sent).await?;
                        }
                    }
                }
                self.push(Item::Event(event), generation);
                Ok(true)
            }
        }
    }

    fn push(&self, item: Item, generation: u64) {
        let mut queue = self.shared.lock();
        if queue.generation != generation {
            return;
        }
        if matches!(item, Item::Event(_)) {
            queue.outstanding += 1;
        }
        queue.items.push_back(item);
        drop(queue);
        self.shared.arrived.notify_waiters();
    }

    fn routing(&self) -> Routing {
        Routing {
            topic_template: self.config.topic_template.clone(),
            tables: self
                .config
                .tables
                .iter()
                .map(|t| (t.qualified(), t.clone()))
                .collect::<HashMap<_, _>>(),
            message_prefix: self.config.message_prefix.clone(),
            outbox_tables: self
                .config
                .outbox_tables
                .iter()
                .map(|t| super::qualified(t))
                .collect(),
        }
    }

    /// The replication session's settings (`options` of its startup).
    fn session_options(&self) -> String {
        match self.config.decoding_work_mem_kb {
            Some(kb) => format!("{SESSION_OPTIONS} -c logical_decoding_work_mem={kb}kB"),
            None => SESSION_OPTIONS.to_string(),
        }
    }

    async fn connection(&self) -> Result<deadpool_postgres::Client, SessionError> {
        self.pool.get().await.map_err(|e| {
            SessionError::Failed(PgError::Connect {
                target: self.pg.target(),
                detail: e.to_string(),
                retryable: true,
            })
        })
    }

    /// Checks the server and the slot, creating what is missing when
    /// allowed; returns the position to stream from.
    async fn prepare(&self) -> Result<super::setup::Prepared, SessionError> {
        let db = self.connection().await?;
        super::setup::prepare(&db, &self.config)
            .await
            .map_err(SessionError::Failed)
    }
}

/// A session's initial load: the loader task and what the stream keeps.
struct LoadRun {
    backfill: Backfill,
    handed: tokio::sync::mpsc::Receiver<Chunk>,
    task: AbortOnDrop<std::result::Result<(), PgError>>,
}

/// A task that ends with the session that started it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum SessionError {
    /// The slot is streamed by another session.
    Held(String),
    Failed(PgError),
}

impl From<PgError> for SessionError {
    fn from(err: PgError) -> Self {
        SessionError::Failed(err)
    }
}

/// A stream that cannot be put back together.
fn stream_failed(err: StreamError) -> SessionError {
    SessionError::Failed(PgError::Replication {
        retryable: err.is_retryable(),
        detail: match &err {
            StreamError::Spill { .. } => {
                format!("{err}; free space there or choose another place (WalConfig::spill_dir)")
            }
            StreamError::Protocol(_) | StreamError::Unattributable { .. } => err.to_string(),
        },
    })
}

/// Classifies an error of the replication connection.
fn classify(err: ClientError) -> SessionError {
    let text = err.to_string();
    if let Some(code) = err.sqlstate() {
        // object_in_use: another session streams the slot.
        if code == "55006" {
            return SessionError::Held(text);
        }
        // 42710: another relay created the slot first.
        let retryable =
            matches!(code.get(..2), Some("08" | "40" | "53" | "57" | "58")) || code == "42710";
        let hint = match code {
            "42704" => "; the slot or publication does not exist: let the relay create it (WalConfig::create) or create it as docs/wal.md shows",
            "42501" | "28000" => "; the user needs the REPLICATION attribute (ALTER ROLE ... REPLICATION) and a pg_hba.conf line that admits it",
            "28P01" => "; check the postgres user and password",
            "55000" => "; the server needs wal_level = logical (a restart)",
            _ => "",
        };
        return SessionError::Failed(PgError::Replication {
            detail: format!("{text}{hint}"),
            retryable,
        });
    }
    let (retryable, hint) = match &err {
        ClientError::Io(_) => (true, ""),
        ClientError::Tls { refused: false, .. } => {
            (true, "; the server broke off the handshake (restarting?)")
        }
        ClientError::Tls { refused: true, .. } => (
            false,
            "; check the TLS settings (sslmode and the CA file, as for the pool)",
        ),
        ClientError::Auth(_) => (false, ""),
        // A stream garbled in transit: a new session reads it again.
        ClientError::Protocol(_) => (true, ""),
        ClientError::Server { .. } => (false, ""),
    };
    SessionError::Failed(PgError::Replication {
        retryable,
        detail: format!("{text}{hint}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retryable(err: ClientError) -> Option<bool> {
        match classify(err) {
            SessionError::Failed(err) => Some(err.is_retryable()),
            SessionError::Held(_) => None,
        }
    }

    fn server(code: &str) -> ClientError {
        ClientError::Server {
            severity: "ERROR".into(),
            code: code.into(),
            message: "m".into(),
            detail: None,
        }
    }

    #[test]
    fn a_server_that_goes_away_is_retried() {
        let cut = ClientError::Tls {
            detail: "unexpected EOF".into(),
            refused: false,
        };
        assert_eq!(retryable(cut), Some(true));
        let reset = ClientError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(retryable(reset), Some(true));
        assert_eq!(retryable(server("57P01")), Some(true), "admin shutdown");
    }

    #[test]
    fn what_waiting_cannot_mend_is_permanent() {
        let refused = ClientError::Tls {
            detail: "certificate verify failed".into(),
            refused: true,
        };
        assert_eq!(retryable(refused), Some(false));
        assert_eq!(retryable(ClientError::Auth("x".into())), Some(false));
        assert_eq!(retryable(server("28P01")), Some(false), "wrong password");
        assert_eq!(retryable(server("42704")), Some(false), "no slot");
        assert_eq!(retryable(server("55006")), None, "held by another relay");
    }
}
