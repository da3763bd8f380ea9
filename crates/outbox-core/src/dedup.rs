//! A bounded memory of recently written event ids, for sinks.

use std::collections::{HashSet, VecDeque};

use uuid::Uuid;

/// The last `capacity` event ids a sink wrote (for one partition, say),
/// oldest forgotten first.
///
/// A relay that died after the broker acknowledged a batch but before its
/// source recorded it publishes the batch again, at new offsets: a sink
/// recognises those copies by their event ids, which land near the
/// originals. The window must cover how far apart they can land.
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
#[derive(Debug, Clone, Default)]
pub struct RecentIds {
    order: VecDeque<Uuid>,
    set: HashSet<Uuid>,
    capacity: usize,
}

impl RecentIds {
    /// An empty window of `capacity` ids (0 remembers nothing).
    pub fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity,
        }
    }

    /// Whether `id` is among the remembered ids.
    pub fn contains(&self, id: &Uuid) -> bool {
        self.set.contains(id)
    }

    /// Remembers `id`, forgetting the oldest beyond the capacity.
    pub fn insert(&mut self, id: Uuid) {
        if self.capacity == 0 || !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}
