//! A bounded memory of recently written event ids, for sinks.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use uuid::Uuid;

/// The last `capacity` event ids a sink wrote (for one partition, say),
/// oldest forgotten first.
///
/// A relay that died after the broker acknowledged a batch but before its
/// source recorded it publishes the batch again, at new offsets: a sink
/// recognises those copies by their event ids, which land near the
/// originals. The window must cover how far apart they can land.
///
/// The ids sit in a ring of exactly `capacity` slots with a hash index of
/// 4-byte slot numbers beside it, rather than a set plus a queue of ids:
/// a consumer holds one window per partition, 100,000 ids each by default,
/// so the bytes per id matter (measured in `docs/performance.md`).
///
/// ```
/// use outbox_core::RecentIds;
/// use uuid::Uuid;
///
/// let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
/// let mut recent = RecentIds::new(2);
/// recent.insert(a);
/// recent.insert(b);
/// recent.insert(c); // forgets a
/// assert!(!recent.contains(&a));
/// assert!(recent.contains(&b) && recent.contains(&c));
/// ```
#[derive(Clone)]
pub struct RecentIds {
    /// Remembered ids; once full, `next` is the oldest and is overwritten next.
    ring: Vec<u128>,
    next: usize,
    /// Slots of `ring`, found by the id's hash.
    index: HashTable<u32>,
    /// Keyed per window, so ids chosen to collide cannot slow every window.
    hasher: RandomState,
    capacity: usize,
    /// With a horizon: when each id was published (ms since the epoch;
    /// `i64::MIN` unknown), slot for slot with `ring`.
    stamps: Vec<i64>,
    newest_ms: i64,
    horizon: Option<Horizon>,
    /// Ids forgotten though younger than the horizon (the window could not grow).
    overruns: u64,
}

#[derive(Debug, Clone, Copy)]
struct Horizon {
    ms: i64,
    max_capacity: usize,
}

impl std::fmt::Debug for RecentIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecentIds")
            .field("len", &self.ring.len())
            .field("capacity", &self.capacity)
            .field("overruns", &self.overruns)
            .finish()
    }
}

impl Default for RecentIds {
    fn default() -> Self {
        Self::new(0)
    }
}

impl RecentIds {
    /// An empty window of `capacity` ids (0 remembers nothing). Memory grows
    /// with the ids remembered, up to the capacity; slot numbers are 32-bit,
    /// so the capacity is at most `u32::MAX` ids.
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Vec::new(),
            next: 0,
            index: HashTable::new(),
            hasher: RandomState::new(),
            capacity: capacity.min(u32::MAX as usize),
            stamps: Vec::new(),
            newest_ms: i64::MIN,
            horizon: None,
            overruns: 0,
        }
    }

    /// A window that starts at `capacity` ids and doubles, up to
    /// `max_capacity`, whenever forgetting its oldest id would forget one
    /// published less than `horizon` before the newest (see
    /// [`RecentIds::insert_at`]). So it covers a time, whatever the rate:
    /// a relay republishes a copy at most its claim timeout plus the
    /// producer's message timeout after the original.
    ///
    /// ```
    /// use std::time::Duration;
    /// use outbox_core::RecentIds;
    /// use uuid::Uuid;
    ///
    /// let mut recent = RecentIds::with_horizon(2, Duration::from_secs(60), 1000);
    /// let ids: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    /// for (n, id) in ids.iter().enumerate() {
    ///     recent.insert_at(*id, 1_000 * n as i64); // one per second
    /// }
    /// assert!(ids.iter().all(|id| recent.contains(id)), "ten seconds fit in the horizon");
    /// assert_eq!(recent.overruns(), 0);
    /// ```
    pub fn with_horizon(
        capacity: usize,
        horizon: std::time::Duration,
        max_capacity: usize,
    ) -> Self {
        let mut recent = Self::new(capacity.max(1));
        recent.horizon = Some(Horizon {
            ms: i64::try_from(horizon.as_millis()).unwrap_or(i64::MAX),
            max_capacity: max_capacity.max(recent.capacity).min(u32::MAX as usize),
        });
        recent
    }

    /// Remembers `id`, published at `published_ms` (ms since the epoch; use
    /// `i64::MIN` when unknown: such an id never makes the window grow).
    /// Without a horizon this is [`RecentIds::insert`].
    pub fn insert_at(&mut self, id: Uuid, published_ms: i64) {
        if let Some(horizon) = self.horizon {
            self.newest_ms = self.newest_ms.max(published_ms);
            if self.ring.len() == self.capacity && self.capacity > 0 {
                let oldest = self.stamps.get(self.next).copied().unwrap_or(i64::MIN);
                let young = oldest != i64::MIN
                    && self.newest_ms.saturating_sub(oldest) < horizon.ms
                    && !self.contains(&id);
                if young {
                    if self.capacity < horizon.max_capacity {
                        self.grow((self.capacity * 2).min(horizon.max_capacity));
                    } else {
                        self.overruns += 1;
                    }
                }
            }
        }
        self.insert_stamped(id, published_ms);
    }

    /// Ids forgotten although they were younger than the horizon, because
    /// the window had reached its largest capacity: each is a copy that
    /// could be written twice. A sink reports these.
    pub fn overruns(&self) -> u64 {
        self.overruns
    }

    /// How many ids the window holds at most now.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Makes room for `capacity` ids: the ring is laid out oldest first
    /// again, so it keeps filling in order, and the index rebuilt.
    fn grow(&mut self, capacity: usize) {
        self.ring.rotate_left(self.next);
        if self.stamps.len() == self.ring.len() {
            self.stamps.rotate_left(self.next);
        }
        self.next = 0;
        self.capacity = capacity;
        self.ring.reserve_exact(capacity - self.ring.len());
        let Self {
            ring,
            index,
            hasher,
            ..
        } = self;
        index.clear();
        for (slot, id) in ring.iter().enumerate() {
            index.insert_unique(Self::hash(hasher, *id), slot as u32, |&s| {
                Self::hash(hasher, ring[s as usize])
            });
        }
    }

    fn hash(hasher: &RandomState, id: u128) -> u64 {
        hasher.hash_one(id)
    }

    /// Whether `id` is among the remembered ids.
    pub fn contains(&self, id: &Uuid) -> bool {
        let id = id.as_u128();
        let ring = &self.ring;
        self.index
            .find(Self::hash(&self.hasher, id), |&slot| {
                ring[slot as usize] == id
            })
            .is_some()
    }

    /// Remembers `id`, forgetting the oldest beyond the capacity.
    pub fn insert(&mut self, id: Uuid) {
        self.insert_at(id, i64::MIN);
    }

    fn insert_stamped(&mut self, id: Uuid, published_ms: i64) {
        if self.capacity == 0 {
            return;
        }
        let id = id.as_u128();
        // Hashed once: this runs for every record a sink writes.
        let hash = Self::hash(&self.hasher, id);
        let ring = &self.ring;
        if self
            .index
            .find(hash, |&slot| ring[slot as usize] == id)
            .is_some()
        {
            return;
        }
        let stamped = self.horizon.is_some();
        let Self {
            ring,
            next,
            index,
            hasher,
            capacity,
            stamps,
            ..
        } = self;
        let slot = if ring.len() < *capacity {
            if ring.len() == ring.capacity() {
                // Grow by doubling, but never past the capacity: a full
                // window holds exactly `capacity` slots.
                let more = ring.len().max(1024).min(*capacity - ring.len());
                ring.reserve_exact(more);
            }
            ring.push(id);
            if stamped {
                stamps.push(published_ms);
            }
            ring.len() - 1
        } else {
            let slot = *next;
            let old = ring[slot];
            if let Ok(entry) = index.find_entry(Self::hash(hasher, old), |&s| s as usize == slot) {
                entry.remove();
            }
            ring[slot] = id;
            if let Some(stamp) = stamps.get_mut(slot) {
                *stamp = published_ms;
            }
            *next = (slot + 1) % *capacity;
            slot
        };
        // `slot` < capacity ≤ u32::MAX.
        let slot = slot as u32;
        let ring = &*ring;
        index.insert_unique(hash, slot, |&s| Self::hash(hasher, ring[s as usize]));
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn forgets_exactly_the_oldest_beyond_capacity() {
        let mut recent = RecentIds::new(1000);
        for n in 0..5000u128 {
            recent.insert(id(n));
            assert_eq!(recent.len(), (n as usize + 1).min(1000));
        }
        for n in 0..4000u128 {
            assert!(!recent.contains(&id(n)), "{n} should be forgotten");
        }
        for n in 4000..5000u128 {
            assert!(recent.contains(&id(n)), "{n} should be remembered");
        }
        assert_eq!(recent.ring.capacity(), 1000);
        assert_eq!(recent.index.len(), 1000);
    }

    #[test]
    fn a_repeated_id_takes_no_second_slot() {
        let mut recent = RecentIds::new(3);
        for n in [1u128, 2, 1, 1, 3] {
            recent.insert(id(n));
        }
        assert_eq!(recent.len(), 3);
        // 4 evicts the oldest, 1 (inserted once), and nothing else.
        recent.insert(id(4));
        assert!(!recent.contains(&id(1)));
        assert!(recent.contains(&id(2)) && recent.contains(&id(3)) && recent.contains(&id(4)));
    }

    /// Invariant (copies recognised at any rate): a window with a horizon
    /// keeps every id published within the horizon of the newest, growing
    /// as needed, and counts what it had to forget at its largest size.
    #[test]
    fn a_horizon_grows_the_window_to_cover_its_time() {
        // 100 ids per second for 30 s, horizon 10 s: at least 1,000 ids.
        let mut recent = RecentIds::with_horizon(16, std::time::Duration::from_secs(10), 4096);
        for n in 0..3000u128 {
            recent.insert_at(id(n), n as i64 * 10);
        }
        let covered = (0..3000u128)
            .rev()
            .take_while(|n| recent.contains(&id(*n)))
            .count();
        println!(
            "capacity={} covered={covered} overruns={}",
            recent.capacity(),
            recent.overruns()
        );
        assert!(covered >= 1000, "covered only {covered}");
        assert_eq!(recent.capacity(), 1024);
        assert_eq!(recent.overruns(), 0);
        for n in 2000..3000u128 {
            assert!(recent.contains(&id(n)), "{n}");
        }

        // The same rate with a cap below what the horizon needs.
        let mut capped = RecentIds::with_horizon(16, std::time::Duration::from_secs(10), 256);
        for n in 0..3000u128 {
            capped.insert_at(id(n), n as i64 * 10);
        }
        assert_eq!(capped.capacity(), 256);
        assert_eq!(capped.overruns(), 3000 - 256);
    }

    #[test]
    fn ids_of_unknown_time_never_grow_the_window() {
        let mut recent = RecentIds::with_horizon(4, std::time::Duration::from_secs(3600), 1024);
        for n in 0..100u128 {
            recent.insert(id(n));
        }
        assert_eq!(
            (recent.capacity(), recent.len(), recent.overruns()),
            (4, 4, 0)
        );
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut recent = RecentIds::new(0);
        recent.insert(id(1));
        assert!(recent.is_empty());
        assert!(!recent.contains(&id(1)));
    }
}
