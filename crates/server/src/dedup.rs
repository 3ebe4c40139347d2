//! The idempotency window: the last N keyed `RecordEvents` batches and how many events each
//! recorded, so a client's retry of a batch that was in fact committed is acknowledged again
//! instead of recorded twice.
//!
//! The window counts keys, not time: memory stays bounded whatever the request rate, and a
//! restart rebuilds it from the keys stored in the event log's records.
//!
//! Each key keeps a digest of its batch's events, so a key reused for a different batch (a client
//! bug that would otherwise silently drop the new batch) is refused rather than acknowledged as a
//! repeat. The digest is recomputed from the events when the log is replayed; keys read back from
//! a compacted log's snapshot have none, and any batch under them counts as a repeat.

use std::collections::{HashMap, VecDeque};

use features::Event;

/// Most bytes in an idempotency key.
pub const MAX_KEY_BYTES: usize = 128;

/// A digest of a batch's events (FNV-1a over their fields): equal batches have equal digests.
pub fn batch_digest(events: &[Event]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for e in events {
        eat(&e.user_id.to_le_bytes());
        eat(&e.ts_ms.to_le_bytes());
        eat(e.event_type.as_str().as_bytes());
        eat(&e.item_id.map_or([0xff; 9], |i| {
            let mut b = [0u8; 9];
            b[1..].copy_from_slice(&i.to_le_bytes());
            b
        }));
        let query = e.query.as_deref().unwrap_or("");
        eat(&(query.len() as u64).to_le_bytes());
        eat(query.as_bytes());
        eat(&e
            .value
            .map_or(u64::MAX, |v| v.to_bits() as u64)
            .to_le_bytes());
    }
    h
}

/// What the window knows of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySeen {
    /// Not in the window: the batch is new.
    New,
    /// The same batch (or one whose content is unknown) was recorded with this many events.
    Repeat(u64),
    /// A different batch was recorded under this key.
    Reused,
}

/// One key's batch: how many events it recorded, and its digest where known.
#[derive(Debug, Clone, Copy)]
struct Entry {
    count: u64,
    digest: Option<u64>,
}

/// The last `capacity` keys, oldest evicted first.
#[derive(Debug)]
pub struct DedupWindow {
    capacity: usize,
    recorded: HashMap<String, Entry>,
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
        self.recorded.get(key).map(|e| e.count)
    }

    /// Whether a batch with `digest` under `key` is new, a repeat, or another batch's key.
    pub fn check(&self, key: &str, digest: u64) -> KeySeen {
        match self.recorded.get(key) {
            None => KeySeen::New,
            Some(e) if e.digest.is_some_and(|d| d != digest) => KeySeen::Reused,
            Some(e) => KeySeen::Repeat(e.count),
        }
    }

    /// Remembers a committed batch (`digest` when its events are known), evicting the oldest
    /// key when the window is full.
    pub fn insert(&mut self, key: &str, count: u64, digest: Option<u64>) {
        if self.capacity == 0 || self.recorded.contains_key(key) {
            return;
        }
        while self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.recorded.remove(&old);
            }
        }
        self.recorded
            .insert(key.to_string(), Entry { count, digest });
        self.order.push_back(key.to_string());
    }

    /// Keys and counts, oldest first (what compaction writes back).
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.order
            .iter()
            .map(|k| (k.as_str(), self.recorded.get(k).map_or(0, |e| e.count)))
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
        w.insert("a", 3, None);
        w.insert("b", 1, None);
        w.insert("a", 9, None); // a repeat never overwrites the first count
        assert_eq!((w.get("a"), w.get("b")), (Some(3), Some(1)));
        w.insert("c", 2, None);
        assert_eq!(
            (w.get("a"), w.get("b"), w.get("c")),
            (None, Some(1), Some(2))
        );
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn a_key_reused_for_a_different_batch_is_told_apart_from_a_retry() {
        let event = |item: u64| Event {
            user_id: 7,
            ts_ms: 1_000,
            event_type: features::EventType::Purchase,
            item_id: Some(item),
            query: None,
            value: None,
        };
        let (first, other) = (vec![event(1)], vec![event(2), event(3)]);
        let mut w = DedupWindow::new(4);
        w.insert("k", 1, Some(batch_digest(&first)));
        assert_eq!(w.check("k", batch_digest(&first)), KeySeen::Repeat(1));
        assert_eq!(w.check("k", batch_digest(&other)), KeySeen::Reused);
        assert_eq!(w.check("new", batch_digest(&other)), KeySeen::New);
        // A key read back from a snapshot has no digest: any batch under it is a repeat.
        w.insert("old", 5, None);
        assert_eq!(w.check("old", batch_digest(&other)), KeySeen::Repeat(5));
    }
}
