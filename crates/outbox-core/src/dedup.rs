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
/// 4-byte slot numbers beside it: about 22 bytes per remembered id, where a
/// set plus a queue of ids took about 75 (a consumer holds one window per
/// partition, 100,000 ids each by default).
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
}

impl std::fmt::Debug for RecentIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecentIds")
            .field("len", &self.ring.len())
            .field("capacity", &self.capacity)
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
        let Self {
            ring,
            next,
            index,
            hasher,
            capacity,
        } = self;
        let slot = if ring.len() < *capacity {
            if ring.len() == ring.capacity() {
                // Grow by doubling, but never past the capacity: a full
                // window holds exactly `capacity` slots.
                let more = ring.len().max(1024).min(*capacity - ring.len());
                ring.reserve_exact(more);
            }
            ring.push(id);
            ring.len() - 1
        } else {
            let slot = *next;
            let old = ring[slot];
            if let Ok(entry) = index.find_entry(Self::hash(hasher, old), |&s| s as usize == slot) {
                entry.remove();
            }
            ring[slot] = id;
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

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut recent = RecentIds::new(0);
        recent.insert(id(1));
        assert!(recent.is_empty());
        assert!(!recent.contains(&id(1)));
    }
}
