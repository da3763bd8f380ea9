//! Ownership of a topic's partitions among several consumers, through
//! PostgreSQL advisory locks.

use std::collections::BTreeSet;
use std::time::Duration;

use outbox_core::{Granter, Lease, Ownership};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{PgConfig, PgError};

mod holdings;
use holdings::{share, Holdings};

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
    ///
    /// A grant is valid for half of it after each answered heartbeat
    /// ([`PartitionLeaseConfig::validity`]), and every lease statement gets
    /// that long to answer: a consumer cut off from Postgres stops writing
    /// well before the server could free its locks.
    pub session_timeout: Duration,
    /// How long a consumer waits after it locked a partition before it
    /// works it, so that the previous owner, whose grant may still have run
    /// up to [`PartitionLeaseConfig::validity`] when its session was ended
    /// (a terminated backend frees locks at once), has stopped writing and
    /// its last aborted insert has settled. At least the session timeout
    /// ([`PartitionLeaseConfig::validate`]). Default: the session timeout.
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

    /// The same with another session timeout: the takeover delay follows
    /// it, and the heartbeat shrinks to a sixth of it when 1 s would not fit
    /// (see [`PartitionLeaseConfig::validate`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use outbox_pg::PartitionLeaseConfig;
    ///
    /// let config = PartitionLeaseConfig::new("g", "t", 4).with_session_timeout(Duration::from_secs(3));
    /// assert_eq!(config.heartbeat, Duration::from_millis(500));
    /// assert_eq!(config.takeover_delay, Duration::from_secs(3));
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn with_session_timeout(mut self, session_timeout: Duration) -> Self {
        self.session_timeout = session_timeout;
        self.takeover_delay = session_timeout;
        self.heartbeat = Duration::from_secs(1).min(session_timeout / 6);
        self
    }

    /// How long a grant holds after the heartbeat that proved it was sent:
    /// half the session timeout.
    pub fn validity(&self) -> Duration {
        self.session_timeout / 2
    }

    /// Checks the relations the fencing relies on: a heartbeat well inside
    /// the validity, and a takeover delay no shorter than the session timeout
    /// (so a new owner starts at least half a session timeout after the old
    /// owner's grant ran out).
    pub fn validate(&self) -> Result<(), PgError> {
        if self.partitions < 1 {
            return Err(PgError::Config(format!(
                "partition leases of topic {}: the topic has {} partitions",
                self.topic, self.partitions
            )));
        }
        if self.heartbeat.is_zero() || self.heartbeat * 2 > self.validity() {
            return Err(PgError::Config(format!(
                "partition leases: heartbeat {:?} must be at most a quarter of the session timeout {:?}, \
                 so that a grant survives a late heartbeat",
                self.heartbeat, self.session_timeout
            )));
        }
        if self.takeover_delay < self.session_timeout {
            return Err(PgError::Config(format!(
                "partition leases: takeover delay {:?} must be at least the session timeout {:?}: \
                 a previous owner may write until half of it after its last heartbeat",
                self.takeover_delay, self.session_timeout
            )));
        }
        Ok(())
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
/// The consumer follows the [`Ownership`] of [`PartitionLeases::start`]: it
/// reads the partitions it may work from `lease` and reports the set it
/// actually works on `applied` (between batches). A partition is unlocked
/// only once `applied` no longer contains it, so a voluntary hand-over
/// never has two writers.
///
/// **Fencing, for the involuntary cases.** Each grant is an
/// [`outbox_core::Lease`] valid for [`PartitionLeaseConfig::validity`] after
/// the heartbeat that proved it was sent, extended by each answered
/// heartbeat; every lease statement has that long to answer, and the
/// session's socket gives up on unacknowledged data as soon
/// (`TCP_USER_TIMEOUT`). A lost session is announced at once as a new
/// epoch with no partitions. A newly locked partition is granted only after
/// [`PartitionLeaseConfig::takeover_delay`]. So when Postgres frees a
/// consumer's locks (it was killed, its backend terminated, the server
/// restarted, or it was cut off and timed out), that consumer's grant has
/// already run out, or does within half a session timeout, before any
/// other consumer is granted the partitions; `outbox_core::Consume::with_lease`
/// abandons a write that outlives its grant.
///
/// ```no_run
/// # async fn example() -> Result<(), outbox_pg::PgError> {
/// use outbox_pg::{PartitionLeaseConfig, PartitionLeases, PgConfig};
///
/// let leases = PartitionLeases::new(PgConfig::default(), PartitionLeaseConfig::new("g", "user_events", 3))?;
/// let (ownership, leasing) = leases.start(tokio_util::sync::CancellationToken::new());
/// tokio::spawn(leasing);
/// // The subscription follows `ownership` (`outbox_core::Consume::with_ownership`):
/// // it reads `ownership.lease.borrow().partitions` and reports the set it
/// // switched to on `ownership.applied`.
/// # drop(ownership); Ok(()) }
/// ```
pub struct PartitionLeases {
    pg: PgConfig,
    config: PartitionLeaseConfig,
    lock_namespace: i32,
    application_name: String,
}

impl PartitionLeases {
    /// Leases for `config`, on the server of `pg`; fails when `config`
    /// does not validate ([`PartitionLeaseConfig::validate`]).
    pub fn new(pg: PgConfig, config: PartitionLeaseConfig) -> Result<Self, PgError> {
        config.validate()?;
        let scope = format!("{}/{}", config.group, config.topic);
        let hash = crate::stable_hash(&format!("outbox-partitions:{scope}"));
        // application_name is at most 63 bytes; the hash keeps it unique.
        let application_name = format!("outbox-consumer {hash:08x}");
        Ok(Self {
            pg,
            config,
            lock_namespace: i32::from_ne_bytes(hash.to_ne_bytes()),
            application_name,
        })
    }

    /// The `application_name` of this group's lease sessions, for finding
    /// them in `pg_stat_activity` (one per live member).
    pub fn application_name(&self) -> &str {
        &self.application_name
    }

    /// Starts sharing: the [`Ownership`] for the subscription (and, cloned,
    /// the consume loop) and the future that keeps the leases (see
    /// [`PartitionLeases::run`]), for the caller to spawn where it tracks
    /// its tasks. A permanent failure of that future ends the grant, so
    /// the consumer stops writing; the caller decides whether to stop.
    pub fn start(
        self,
        shutdown: CancellationToken,
    ) -> (
        Ownership,
        impl std::future::Future<Output = Result<(), PgError>> + Send + 'static,
    ) {
        let (granter, ownership) = outbox_core::ownership();
        (ownership, self.run(granter, shutdown))
    }

    /// Keeps ownership until `shutdown`, publishing each grant on
    /// `granter.lease` and releasing a partition once `granter.applied` no
    /// longer holds it. Connection failures are retried; while disconnected
    /// nothing is granted.
    pub async fn run(self, granter: Granter, shutdown: CancellationToken) -> Result<(), PgError> {
        let Granter {
            lease: owned,
            mut applied,
        } = granter;
        let mut epoch = owned.borrow().epoch;
        while !shutdown.is_cancelled() {
            // Whatever happened before, nothing is granted without a
            // session, and a write still running under the old one stops.
            epoch += 1;
            revoke(&owned, epoch);
            match self.session(epoch, &owned, &mut applied, &shutdown).await {
                Ok(()) => break,
                Err(err) if err.is_retryable() => {
                    epoch += 1;
                    revoke(&owned, epoch);
                    warn!(error = %err, "partition ownership lost; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(self.config.heartbeat) => {}
                    }
                }
                Err(err) => {
                    revoke(&owned, epoch + 1);
                    return Err(err);
                }
            }
        }
        revoke(&owned, epoch + 1);
        Ok(())
    }

    /// The session's client, and a token cancelled when its connection ends.
    async fn connect(&self) -> Result<(Client, CancellationToken), PgError> {
        let mut pg = self.pg.client_config();
        pg.application_name(&self.application_name);
        // With data outstanding, keepalives never fire: without this a
        // statement sent into a dead path waits for the kernel's
        // retransmissions (about 15 minutes).
        pg.tcp_user_timeout(self.config.validity());
        let (client, connection) = self.pg.connect_session(&pg).await?;
        let ended = CancellationToken::new();
        let signal = ended.clone();
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(error = %err, "partition lease connection ended");
            }
            // The server freed the locks: stop granting at once, not at
            // the next heartbeat.
            signal.cancel();
        });
        Ok((client, ended))
    }

    /// One session: returns `Ok` on shutdown, `Err` when the session is lost.
    async fn session(
        &self,
        epoch: u64,
        owned_tx: &watch::Sender<Lease>,
        applied: &mut watch::Receiver<Vec<i32>>,
        shutdown: &CancellationToken,
    ) -> Result<(), PgError> {
        let limit = self.config.validity();
        let (client, ended) = bounded(limit, "partition lease (connect)", self.connect()).await?;
        let statement = |operation: &'static str, sql: String| {
            let client = &client;
            async move {
                bounded(limit, operation, async move {
                    client
                        .batch_execute(&sql)
                        .await
                        .map_err(|e| PgError::query(operation, e))
                })
                .await
            }
        };
        statement(
            "partition lease (begin)",
            format!(
                "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}",
                self.config.session_timeout.as_millis()
            ),
        )
        .await?;
        let mut holdings = Holdings::default();
        let mut rotation = std::process::id() as usize;
        loop {
            // The grant is proven from when this round's first statement was
            // sent: the server's idle timer restarts only after that.
            let round_sent = Instant::now();
            // Activity statistics are a snapshot cached for the whole
            // transaction: drop it, or the member count never changes.
            statement(
                "partition lease (heartbeat)",
                "SELECT pg_stat_clear_snapshot()".into(),
            )
            .await?;
            let valid_until = round_sent + limit;
            let members: i64 = bounded(limit, "partition lease (heartbeat)", async {
                client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                        &[&self.application_name],
                    )
                    .await
                    .and_then(|row| row.try_get(0))
                    .map_err(|e| PgError::query("partition lease (heartbeat)", e))
            })
            .await?;
            let members = usize::try_from(members.max(1)).unwrap_or(1);
            let partitions = usize::try_from(self.config.partitions.max(0)).unwrap_or(0);
            // How many partitions each member holds (members holding none
            // do not appear): the fewest decides whether someone starves.
            let holders = bounded(limit, "partition lease (heartbeat)", async {
                client
                    .query(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 \
                         AND granted AND classid::bigint = ($1::bigint & 4294967295) GROUP BY pid",
                        &[&i64::from(self.lock_namespace)],
                    )
                    .await
                    .map_err(|e| PgError::query("partition lease (heartbeat)", e))
            })
            .await?;
            let held: Vec<usize> = holders
                .iter()
                .map(|row| usize::try_from(row.try_get::<_, i64>(0).unwrap_or(0)).unwrap_or(0))
                .collect();
            let keep = share(partitions, members, &held);

            let applied_now: BTreeSet<i32> = applied.borrow_and_update().iter().copied().collect();
            for partition in holdings.handed_over(&applied_now) {
                self.unlock(&client, partition).await?;
                info!(topic = %self.config.topic, partition, "partition handed over");
            }
            for partition in holdings.give_back(keep) {
                self.unlock(&client, partition).await?;
            }
            if holdings.wants_more(keep) {
                rotation = rotation.wrapping_add(1);
                for partition in holdings.candidates(partitions, rotation) {
                    if !holdings.wants_more(keep) {
                        break;
                    }
                    let got: bool = bounded(limit, "partition lease (acquire)", async {
                        client
                            .query_one(
                                "SELECT pg_try_advisory_lock($1::int, $2::int)",
                                &[&self.lock_namespace, &partition],
                            )
                            .await
                            .and_then(|row| row.try_get(0))
                            .map_err(|e| PgError::query("partition lease (acquire)", e))
                    })
                    .await?;
                    if got {
                        info!(topic = %self.config.topic, partition, "partition locked; granted after the takeover delay");
                        holdings.locked(partition, Instant::now());
                    }
                }
            }
            for partition in holdings.ripen(Instant::now(), self.config.takeover_delay) {
                info!(topic = %self.config.topic, partition, "partition taken");
            }
            let lease = Lease {
                partitions: holdings.granted(),
                epoch,
                valid_until: Some(valid_until),
            };
            owned_tx.send_replace(lease);

            tokio::select! {
                _ = shutdown.cancelled() => {
                    revoke(owned_tx, epoch + 1);
                    // Closing the session releases every lock.
                    let _ = tokio::time::timeout(limit, client.batch_execute("ROLLBACK")).await;
                    return Ok(());
                }
                _ = ended.cancelled() => {
                    return Err(PgError::Connect {
                        target: self.pg.target(),
                        detail: "the partition lease session ended (backend terminated or server restarted)".into(),
                        retryable: true,
                    });
                }
                _ = tokio::time::sleep(self.config.heartbeat) => {}
                _ = applied.changed() => {}
            }
        }
    }

    async fn unlock(&self, client: &Client, partition: i32) -> Result<(), PgError> {
        bounded(self.config.validity(), "partition lease (release)", async {
            client
                .execute(
                    "SELECT pg_advisory_unlock($1::int, $2::int)",
                    &[&self.lock_namespace, &partition],
                )
                .await
                .map_err(|e| PgError::query("partition lease (release)", e))
        })
        .await
        .map(drop)
    }
}

/// Announces that nothing is granted any more, under a new epoch, so a write
/// still running under the old grant is abandoned at once.
fn revoke(owned: &watch::Sender<Lease>, epoch: u64) {
    owned.send_replace(Lease {
        partitions: Vec::new(),
        epoch,
        valid_until: Some(Instant::now()),
    });
}

/// Runs `call` with a client-side limit: a statement sent into a dead path
/// must not hang the lease past the time it is valid.
async fn bounded<T>(
    limit: Duration,
    operation: &'static str,
    call: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or(Err(PgError::TimedOut {
            operation,
            after: limit,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_relations_are_validated() {
        let mut config = PartitionLeaseConfig::new("g", "t", 4);
        assert!(config.validate().is_ok(), "the defaults hold");
        config.takeover_delay = config.session_timeout / 2;
        assert!(config.validate().is_err());
        config.takeover_delay = config.session_timeout;
        config.heartbeat = config.session_timeout;
        assert!(config.validate().is_err());
        config.heartbeat = Duration::from_millis(500);
        config.partitions = 0;
        assert!(config.validate().is_err());
    }
}
