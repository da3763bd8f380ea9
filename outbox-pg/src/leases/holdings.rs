//! The rules by which one member's partitions change: pure decisions, with
//! the locking and unlocking left to the lease session.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

/// What one member holds, and the rules by which it changes; the session
/// does the locking and unlocking these decide.
#[derive(Debug, Default)]
pub(super) struct Holdings {
    /// Granted: the consumer may work them.
    owned: BTreeSet<i32>,
    /// Locked, not granted yet: partition → when it was locked.
    taking: BTreeMap<i32, Instant>,
    /// Given back, still locked until the consumer stops working them.
    releasing: BTreeSet<i32>,
}

impl Holdings {
    /// Partitions being given back that the consumer no longer works: to
    /// unlock now (a voluntary hand-over never has two writers).
    pub(super) fn handed_over(&mut self, applied: &BTreeSet<i32>) -> Vec<i32> {
        let done: Vec<i32> = self
            .releasing
            .iter()
            .copied()
            .filter(|p| !applied.contains(p))
            .collect();
        for partition in &done {
            self.releasing.remove(partition);
        }
        done
    }

    /// Gives back what exceeds `keep`: partitions not granted yet first
    /// (nobody works them: returned, to unlock now), then the highest
    /// granted ones (moved to releasing, unlocked once no longer applied).
    pub(super) fn give_back(&mut self, keep: usize) -> Vec<i32> {
        let mut unlock = Vec::new();
        while self.owned.len() + self.taking.len() > keep {
            if let Some((&partition, _)) = self.taking.iter().next_back() {
                self.taking.remove(&partition);
                unlock.push(partition);
            } else if let Some(&partition) = self.owned.iter().next_back() {
                self.owned.remove(&partition);
                self.releasing.insert(partition);
            }
        }
        unlock
    }

    /// Whether to try locking more: below `keep`, and not while giving
    /// any back (the share is moving the other way).
    pub(super) fn wants_more(&self, keep: usize) -> bool {
        self.owned.len() + self.taking.len() < keep && self.releasing.is_empty()
    }

    /// Partitions to try, starting at `rotation` (so members do not all
    /// race for the same one), skipping those held.
    pub(super) fn candidates(&self, partitions: usize, rotation: usize) -> Vec<i32> {
        (0..partitions)
            .map(|step| i32::try_from((rotation + step) % partitions).unwrap_or(0))
            .filter(|p| !self.owned.contains(p) && !self.taking.contains_key(p))
            .collect()
    }

    /// `partition` was locked at `at`.
    pub(super) fn locked(&mut self, partition: i32, at: Instant) {
        self.taking.insert(partition, at);
    }

    /// Grants the partitions locked at least `takeover_delay` before `now`.
    pub(super) fn ripen(&mut self, now: Instant, takeover_delay: Duration) -> Vec<i32> {
        let ripe: Vec<i32> = self
            .taking
            .iter()
            .filter(|(_, locked)| now.duration_since(**locked) >= takeover_delay)
            .map(|(partition, _)| *partition)
            .collect();
        for partition in &ripe {
            self.taking.remove(partition);
            self.owned.insert(*partition);
        }
        ripe
    }

    /// The granted partitions, ascending.
    pub(super) fn granted(&self) -> Vec<i32> {
        self.owned.iter().copied().collect()
    }
}

/// How many partitions this member should hold: every member ends with
/// `floor` or `ceil` of partitions / members; when some member (`held` lists
/// the holdings of the members that hold any) is below `floor`, nobody
/// keeps more than `floor`.
pub(super) fn share(partitions: usize, members: usize, held: &[usize]) -> usize {
    let members = members.max(1);
    let fewest = if held.len() < members {
        0
    } else {
        held.iter().copied().min().unwrap_or(0)
    };
    let floor = partitions / members;
    let ceil = partitions.div_ceil(members);
    if fewest < floor {
        floor
    } else {
        ceil
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member taking over: locked partitions are granted only after the
    /// takeover delay; above its share it gives back the ungranted first,
    /// then the highest granted, which it unlocks only once the consumer
    /// stopped working them; it does not take more while giving back.
    #[test]
    fn holdings_grant_late_give_back_in_order_and_hand_over_when_stopped() {
        let start = Instant::now();
        let delay = Duration::from_secs(6);
        let mut h = Holdings::default();
        assert_eq!(h.candidates(4, 2), [2, 3, 0, 1]);
        for p in [0, 1, 2] {
            h.locked(p, start);
        }
        assert!(
            h.ripen(start + delay / 2, delay).is_empty(),
            "not before the delay"
        );
        assert!(h.granted().is_empty());
        assert_eq!(h.ripen(start + delay, delay), [0, 1, 2]);
        h.locked(3, start + delay);
        assert_eq!(h.candidates(4, 0), Vec::<i32>::new());

        // The share drops to 2: the ungranted 3 goes at once, then 2.
        assert_eq!(h.give_back(2), [3]);
        assert_eq!(h.granted(), [0, 1]);
        assert!(!h.wants_more(3), "no taking while giving back");
        let still_working = BTreeSet::from([0, 1, 2]);
        assert!(
            h.handed_over(&still_working).is_empty(),
            "2 is still worked"
        );
        assert_eq!(h.handed_over(&BTreeSet::from([0, 1])), [2]);
        assert!(h.wants_more(3) && !h.wants_more(2));
    }

    #[test]
    fn shares_are_floor_or_ceil_and_starving_members_win() {
        assert_eq!(share(4, 2, &[2, 2]), 2);
        assert_eq!(share(4, 3, &[2, 2]), 1, "a member holding none starves");
        assert_eq!(share(4, 3, &[2, 1, 1]), 2);
        assert_eq!(share(5, 2, &[3, 2]), 3);
        assert_eq!(share(3, 0, &[]), 3);
    }
}
