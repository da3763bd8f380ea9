//! Which partitions a consumer may write, and until when it may write them.

use tokio::sync::watch;
use tokio::time::Instant;

/// The partitions a consumer may work, as granted by whatever shares them
/// among consumers (for example `outbox_pg::PartitionLeases`), sent on a
/// `tokio::sync::watch` channel to the subscription (which reads only these
/// partitions) and to [`crate::Consume::with_lease`] (which fences writes).
///
/// **The granter's contract.**
/// - No other consumer can be granted any of `partitions` before
///   `valid_until` plus the granter's takeover delay. So a consumer whose
///   writes have ended by `valid_until` never overlaps the next owner, even
///   when it was cut off and does not know it yet.
/// - `valid_until` only moves forward while the grant is proven (a
///   heartbeat answered); a grant that cannot be proven simply expires.
/// - `epoch` changes whenever the holder may have lost a partition it still
///   lists (a new session, a partition taken): a consumer that sees a new
///   epoch must assume another owner wrote in between, and forget what it
///   cached about positions.
///
/// ```
/// use std::time::Duration;
/// use outbox_core::Lease;
/// use tokio::time::Instant;
///
/// let now = Instant::now();
/// let lease = Lease { partitions: vec![0, 2], epoch: 1, valid_until: Some(now + Duration::from_secs(3)) };
/// assert!(lease.allows([0, 2], now));
/// assert!(!lease.allows([1], now));
/// assert!(!lease.allows([0], now + Duration::from_secs(3)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lease {
    /// The partitions that may be worked, ascending.
    pub partitions: Vec<i32>,
    /// Changes whenever ownership may have moved away and back.
    pub epoch: u64,
    /// Writes of these partitions must have ended by then; `None`: no expiry.
    pub valid_until: Option<Instant>,
}

impl Lease {
    /// Whether the grant still holds at `now`.
    pub fn is_valid(&self, now: Instant) -> bool {
        match self.valid_until {
            Some(until) => now < until,
            None => true,
        }
    }

    /// Whether a write of records of `partitions` may run at `now`.
    pub fn allows(&self, partitions: impl IntoIterator<Item = i32>, now: Instant) -> bool {
        self.is_valid(now)
            && partitions
                .into_iter()
                .all(|p| self.partitions.binary_search(&p).is_ok())
    }

    /// Whether a write that started under `self` must be abandoned now that
    /// the grant is `next`: the epoch moved, so the partitions may have had
    /// another owner since. A partition handed over voluntarily (dropped from
    /// `partitions` in the same epoch) stays with the write until it ends:
    /// the granter waits for the consumer to report it stopped.
    pub fn revoked_by(&self, next: &Lease) -> bool {
        next.epoch != self.epoch
    }
}

/// The granting end of partition ownership (held by whatever shares the
/// partitions among consumers, for example `outbox_pg::PartitionLeases`):
/// it publishes each [`Lease`] and learns which partitions the consumer
/// has actually switched to, so that it hands a dropped partition to
/// another consumer only after this one stopped reading it.
#[derive(Debug)]
pub struct Granter {
    /// The current grant.
    pub lease: watch::Sender<Lease>,
    /// The partitions the consumer works now (after its current batch).
    pub applied: watch::Receiver<Vec<i32>>,
}

/// The following end: the subscription reads only `lease`'s partitions and
/// reports on `applied` the set it switched to (between batches); the
/// consume loop fences writes by `lease` ([`crate::Consume::with_lease`],
/// with a clone of the receiver).
#[derive(Debug)]
pub struct Ownership {
    /// The current grant.
    pub lease: watch::Receiver<Lease>,
    /// Where the follower reports the partitions it works.
    pub applied: watch::Sender<Vec<i32>>,
}

/// A connected pair: nothing granted yet.
///
/// ```
/// let (granter, ownership) = outbox_core::ownership();
/// granter.lease.send_modify(|lease| lease.partitions = vec![0, 1]);
/// assert_eq!(ownership.lease.borrow().partitions, [0, 1]);
/// ownership.applied.send_replace(vec![0, 1]);
/// assert_eq!(*granter.applied.borrow(), [0, 1]);
/// ```
pub fn ownership() -> (Granter, Ownership) {
    let (lease_tx, lease_rx) = watch::channel(Lease::default());
    let (applied_tx, applied_rx) = watch::channel(Vec::new());
    (
        Granter {
            lease: lease_tx,
            applied: applied_rx,
        },
        Ownership {
            lease: lease_rx,
            applied: applied_tx,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lease(partitions: &[i32], epoch: u64, valid_for_ms: Option<u64>) -> (Lease, Instant) {
        let now = Instant::now();
        let lease = Lease {
            partitions: partitions.to_vec(),
            epoch,
            valid_until: valid_for_ms.map(|ms| now + Duration::from_millis(ms)),
        };
        (lease, now)
    }

    #[test]
    fn an_expired_or_partial_grant_allows_nothing() {
        let (l, now) = lease(&[1, 3], 4, Some(100));
        assert!(l.allows([1, 3, 3], now));
        assert!(!l.allows([1, 2], now));
        assert!(!l.allows([1], now + Duration::from_millis(100)));
        let (unbounded, now) = lease(&[0], 0, None);
        assert!(unbounded.allows([0], now + Duration::from_secs(86_400)));
        assert!(Lease::default().allows([], now));
    }

    #[test]
    fn a_new_epoch_revokes_and_a_voluntary_release_does_not() {
        let (l, _) = lease(&[1, 3], 4, Some(100));
        let (renewed, _) = lease(&[1, 3], 4, Some(900));
        assert!(!l.revoked_by(&renewed));
        let (released, _) = lease(&[1], 4, Some(900));
        assert!(!l.revoked_by(&released));
        let (new_session, _) = lease(&[1, 3], 5, Some(900));
        assert!(l.revoked_by(&new_session));
    }
}
