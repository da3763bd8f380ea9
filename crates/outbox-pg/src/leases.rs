//! Ownership of a topic's partitions among several consumers, through
//! PostgreSQL advisory locks.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{PgConfig, PgError};

/// Settings of [`PartitionLeases`].
#[derive(Debug, Clone)]
pub struct PartitionLeaseConfig {
    /// Consumer group: consumers of one group share the partitions.
    pub group: String,
    /// Topic whose partitions are shared.
    pub topic: String,
    /// Number of partitions of the topic.
    pub partitions: i32,
    /// How often ownership is renewed and rebalanced. Default: 1 s.
    pub heartbeat: Duration,
    /// How long a consumer may stay silent before Postgres ends its session
    /// and its partitions go to the others. Default: 6 s.
    pub session_timeout: Duration,
    /// How long a consumer that (re)connected waits before taking free
    /// partitions, so that a previous owner that lost its session has
    /// noticed and stopped writing. Default: the session timeout.
    pub takeover_delay: Duration,
}

impl PartitionLeaseConfig {
    /// Defaults for `group` reading `partitions` partitions of `topic`.
    pub fn new(group: impl Into<String>, topic: impl Into<String>, partitions: i32) -> Self {
        Self {
            group: group.into(),
            topic: topic.into(),
            partitions,
            heartbeat: Duration::from_secs(1),
            session_timeout: Duration::from_secs(6),
            takeover_delay: Duration::from_secs(6),
        }
    }
}

/// Shares a topic's partitions among the consumers of a group, so that
/// each partition has exactly one writer and the partitions of a consumer
/// that died are taken over by the others within a bounded time.
///
/// Each consumer holds one Postgres session with session-level advisory
/// locks, one per partition it owns, and keeps a transaction open in which
/// it runs a heartbeat statement every [`PartitionLeaseConfig::heartbeat`].
/// A consumer killed at any moment loses its session, and with it its
/// locks, at once. One that hangs or is stopped is cut off by Postgres after
/// [`PartitionLeaseConfig::session_timeout`] (`idle_in_transaction_session_timeout`).
/// Every member ends with `floor` or `ceil` of partitions / members (members
/// counted from the sessions of the group, holdings read from `pg_locks`): a
/// member above its share, or at `ceil` while another is below `floor`, gives
/// partitions back; one below takes free ones.
///
/// The consumer loop reads the partitions it may work from
/// [`PartitionLeases::run`]'s `owned` channel and reports the set it
/// actually works on `applied` (between batches). A partition is unlocked
/// only once `applied` no longer contains it, so a voluntary hand-over
/// never has two writers.
///
/// ```no_run
/// # async fn example() -> Result<(), outbox_pg::PgError> {
/// use outbox_pg::{PartitionLeaseConfig, PartitionLeases, PgConfig};
/// use tokio::sync::watch;
///
/// let (owned_tx, owned_rx) = watch::channel(Vec::new());
/// let (applied_tx, applied_rx) = watch::channel(Vec::new());
/// let leases = PartitionLeases::new(PgConfig::default(), PartitionLeaseConfig::new("g", "user_events", 3));
/// tokio::spawn(leases.run(owned_tx, applied_rx, tokio_util::sync::CancellationToken::new()));
/// // The consumer loop: assign `owned_rx.borrow()`, then `applied_tx.send(...)`.
/// # drop((owned_rx, applied_tx)); Ok(()) }
/// ```
pub struct PartitionLeases {
    pg: PgConfig,
    config: PartitionLeaseConfig,
    lock_namespace: i32,
    application_name: String,
}

impl PartitionLeases {
    /// Leases for `config`, on the server of `pg`.
    pub fn new(pg: PgConfig, config: PartitionLeaseConfig) -> Self {
        let scope = format!("{}/{}", config.group, config.topic);
        let hash = crate::stable_hash(&format!("outbox-partitions:{scope}"));
        // application_name is at most 63 bytes; the hash keeps it unique.
        let application_name = format!("outbox-consumer {hash:08x}");
        Self {
            pg,
            config,
            lock_namespace: i32::from_ne_bytes(hash.to_ne_bytes()),
            application_name,
        }
    }

    /// Keeps ownership until `shutdown`, publishing the owned partitions on
    /// `owned` and releasing a partition once `applied` no longer holds it.
    /// Connection failures are retried; while disconnected nothing is owned.
    pub async fn run(
        self,
        owned: watch::Sender<Vec<i32>>,
        mut applied: watch::Receiver<Vec<i32>>,
        shutdown: CancellationToken,
    ) -> Result<(), PgError> {
        while !shutdown.is_cancelled() {
            // Whatever happened before, nothing is owned without a session.
            let _ = owned.send(Vec::new());
            match self.session(&owned, &mut applied, &shutdown).await {
                Ok(()) => break,
                Err(err) if err.is_retryable() => {
                    warn!(error = %err, "partition ownership lost; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(self.config.heartbeat) => {}
                    }
                }
                Err(err) => return Err(err),
            }
        }
        let _ = owned.send(Vec::new());
        Ok(())
    }

    async fn connect(&self) -> Result<Client, PgError> {
        let mut pg = self.pg.client_config();
        pg.application_name(&self.application_name);
        let (client, connection) = self.pg.connect_session(&pg).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(error = %err, "partition lease connection ended");
            }
        });
        Ok(client)
    }

    /// One session: returns `Ok` on shutdown, `Err` when the session is lost.
    async fn session(
        &self,
        owned_tx: &watch::Sender<Vec<i32>>,
        applied: &mut watch::Receiver<Vec<i32>>,
        shutdown: &CancellationToken,
    ) -> Result<(), PgError> {
        let client = self.connect().await?;
        client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}",
                self.config.session_timeout.as_millis()
            ))
            .await
            .map_err(|e| PgError::query("partition lease (begin)", e))?;
        let started = tokio::time::Instant::now();
        let mut owned: BTreeSet<i32> = BTreeSet::new();
        let mut releasing: BTreeSet<i32> = BTreeSet::new();
        let mut rotation = std::process::id() as usize;
        loop {
            // Activity statistics are a snapshot cached for the whole
            // transaction: drop it, or the member count never changes.
            client
                .batch_execute("SELECT pg_stat_clear_snapshot()")
                .await
                .map_err(|e| PgError::query("partition lease (heartbeat)", e))?;
            let members: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    &[&self.application_name],
                )
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|e| PgError::query("partition lease (heartbeat)", e))?;
            let members = usize::try_from(members.max(1)).unwrap_or(1);
            let partitions = usize::try_from(self.config.partitions.max(0)).unwrap_or(0);
            // How many partitions each member holds (members holding none
            // do not appear): the fewest decides whether someone starves.
            let holders = client
                .query(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 \
                     AND granted AND classid::bigint = ($1::bigint & 4294967295) GROUP BY pid",
                    &[&i64::from(self.lock_namespace)],
                )
                .await
                .map_err(|e| PgError::query("partition lease (heartbeat)", e))?;
            let fewest = if holders.len() < members {
                0
            } else {
                holders
                    .iter()
                    .map(|row| usize::try_from(row.try_get::<_, i64>(0).unwrap_or(0)).unwrap_or(0))
                    .min()
                    .unwrap_or(0)
            };
            // Each member ends with floor or ceil of partitions / members.
            let floor = partitions / members;
            let ceil = partitions.div_ceil(members);
            let someone_starves = fewest < floor;

            // Release what the consumer loop no longer works.
            let applied_now: BTreeSet<i32> = applied.borrow_and_update().iter().copied().collect();
            let done: Vec<i32> = releasing
                .iter()
                .copied()
                .filter(|p| !applied_now.contains(p))
                .collect();
            for partition in done {
                client
                    .execute(
                        "SELECT pg_advisory_unlock($1::int, $2::int)",
                        &[&self.lock_namespace, &partition],
                    )
                    .await
                    .map_err(|e| PgError::query("partition lease (release)", e))?;
                releasing.remove(&partition);
                info!(topic = %self.config.topic, partition, "partition handed over");
            }

            let keep = if someone_starves { floor } else { ceil };
            if owned.len() > keep {
                // Give back the excess, highest first; unlocked once not applied.
                let excess: Vec<i32> = owned
                    .iter()
                    .rev()
                    .take(owned.len() - keep)
                    .copied()
                    .collect();
                for partition in excess {
                    owned.remove(&partition);
                    releasing.insert(partition);
                }
            } else if owned.len() < keep
                && releasing.is_empty()
                && started.elapsed() >= self.config.takeover_delay
            {
                rotation = rotation.wrapping_add(1);
                for step in 0..partitions {
                    if owned.len() >= keep {
                        break;
                    }
                    let partition = i32::try_from((rotation + step) % partitions).unwrap_or(0);
                    if owned.contains(&partition) {
                        continue;
                    }
                    let got: bool = client
                        .query_one(
                            "SELECT pg_try_advisory_lock($1::int, $2::int)",
                            &[&self.lock_namespace, &partition],
                        )
                        .await
                        .and_then(|row| row.try_get(0))
                        .map_err(|e| PgError::query("partition lease (acquire)", e))?;
                    if got {
                        info!(topic = %self.config.topic, partition, "partition taken");
                        owned.insert(partition);
                    }
                }
            }
            let list: Vec<i32> = owned.iter().copied().collect();
            owned_tx.send_if_modified(|current| {
                if *current == list {
                    false
                } else {
                    current.clone_from(&list);
                    true
                }
            });

            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = owned_tx.send(Vec::new());
                    // Closing the session releases every lock.
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Ok(());
                }
                _ = tokio::time::sleep(self.config.heartbeat) => {}
                _ = applied.changed() => {}
            }
        }
    }
}
