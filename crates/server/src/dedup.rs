//! The idempotency window: the last N keyed `RecordEvents` batches and how many events each
//! recorded, so a client's retry of a batch that was in fact committed is acknowledged again
//! instead of recorded twice.
//!
//! The window counts keys, not time: memory stays bounded whatever the request rate, and a
//! restart rebuilds it from the keys stored in the event log's records.

use std::collections::{HashMap, VecDeque};

/// Most bytes in an idempotency key.
pub const MAX_KEY_BYTES: usize = 128;

/// The last `capacity` keys, oldest evicted first.
#[derive(Debug)]
pub struct DedupWindow {
    capacity: usize,
    recorded: HashMap<String, u64>,
    order: VecDeque<String>,
}

impl DedupWindow {
    pub fn new(capacity: usize) -> DedupWindow {
        DedupWindow {
            capacity,
            recorded: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// How many events the batch with `key` recorded, if it is in the window.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.recorded.get(key).copied()
    }

    /// Remembers a committed batch, evicting the oldest key when the window is full.
    pub fn insert(&mut self, key: &str, count: u64) {
        if self.capacity == 0 || self.recorded.contains_key(key) {
            return;
        }
        while self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.recorded.remove(&old);
            }
        }
        self.recorded.insert(key.to_string(), count);
        self.order.push_back(key.to_string());
    }

    /// Keys and counts, oldest first (what compaction writes back).
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.order
            .iter()
            .map(|k| (k.as_str(), self.recorded.get(k).copied().unwrap_or(0)))
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_keys_and_their_counts() {
        let mut w = DedupWindow::new(2);
        w.insert("a", 3);
        w.insert("b", 1);
        w.insert("a", 9); // a repeat never overwrites the first count
        assert_eq!((w.get("a"), w.get("b")), (Some(3), Some(1)));
        w.insert("c", 2);
        assert_eq!(
            (w.get("a"), w.get("b"), w.get("c")),
            (None, Some(1), Some(2))
        );
        assert_eq!(w.len(), 2);
    }
}
