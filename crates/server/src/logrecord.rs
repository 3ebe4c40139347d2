//! The event log's record format: `len: u32 LE`, `crc32: u32 LE` of the payload, the payload.
//!
//! A payload starts with a `u32` head. Without the state bit it is one `RecordEvents` batch:
//! the event count (the top bit set when an idempotency key, `len: u16` and bytes, follows), then
//! each event. With the state bit (written only by compaction) a kind byte follows and the
//! payload carries derived state instead of events: a user's seen items that are no longer in
//! its kept events, interaction counts of events compaction dropped, or the idempotency window.
//! Logs written before keys and compaction read unchanged.

use features::{Event, EventType};

/// Larger length fields are treated as damage rather than allocated.
pub const MAX_RECORD: u32 = 256 << 20;

const HAS_ITEM: u8 = 1;
const HAS_QUERY: u8 = 2;
const HAS_VALUE: u8 = 4;
/// Head bit: an idempotency key follows the event count.
const KEYED: u32 = 1 << 31;
/// Head bit: a state record (compaction output), not a batch.
const STATE: u32 = 1 << 30;

const KIND_SEEN: u8 = 1;
const KIND_COUNTS: u8 = 2;
const KIND_KEYS: u8 = 3;

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A `RecordEvents` batch (or the kept events of one user, after compaction).
    Batch {
        events: Vec<Event>,
        key: Option<String>,
    },
    /// Items a user interacted with whose events compaction dropped (still excluded as seen).
    Seen { user_id: u64, items: Vec<u64> },
    /// Interaction counts of the events compaction dropped (item popularity).
    Counts(Vec<(u64, u64)>),
    /// The idempotency window: keys and their batches' event counts, oldest first.
    Keys(Vec<(String, u64)>),
}

fn frame(mut p: Vec<u8>) -> Vec<u8> {
    let len = (p.len() - 8) as u32;
    let crc = crc32fast::hash(&p[8..]);
    p[..4].copy_from_slice(&len.to_le_bytes());
    p[4..8].copy_from_slice(&crc.to_le_bytes());
    p
}

/// Encodes a batch of events, with its idempotency key if it has one, as one record. Keys are
/// at most [`crate::dedup::MAX_KEY_BYTES`] long.
pub fn encode_batch(events: &[Event], key: Option<&str>) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + events.len() * 32);
    p.extend_from_slice(&[0; 8]);
    let count = events.len() as u32;
    match key {
        Some(k) => {
            p.extend_from_slice(&(count | KEYED).to_le_bytes());
            p.extend_from_slice(&(k.len() as u16).to_le_bytes());
            p.extend_from_slice(k.as_bytes());
        }
        None => p.extend_from_slice(&count.to_le_bytes()),
    }
    for e in events {
        p.extend_from_slice(&e.user_id.to_le_bytes());
        p.extend_from_slice(&e.ts_ms.to_le_bytes());
        p.push(e.event_type.code() as u8);
        let flags = (e.item_id.is_some() as u8 * HAS_ITEM)
            | (e.query.is_some() as u8 * HAS_QUERY)
            | (e.value.is_some() as u8 * HAS_VALUE);
        p.push(flags);
        if let Some(id) = e.item_id {
            p.extend_from_slice(&id.to_le_bytes());
        }
        if let Some(q) = &e.query {
            p.extend_from_slice(&(q.len() as u32).to_le_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        if let Some(v) = e.value {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    frame(p)
}

/// Encodes a state record (compaction output).
pub fn encode_state(record: &Record) -> Vec<u8> {
    let mut p = vec![0; 8];
    p.extend_from_slice(&STATE.to_le_bytes());
    match record {
        Record::Batch { events, key } => return encode_batch(events, key.as_deref()),
        Record::Seen { user_id, items } => {
            p.push(KIND_SEEN);
            p.extend_from_slice(&user_id.to_le_bytes());
            p.extend_from_slice(&(items.len() as u32).to_le_bytes());
            for i in items {
                p.extend_from_slice(&i.to_le_bytes());
            }
        }
        Record::Counts(counts) => {
            p.push(KIND_COUNTS);
            p.extend_from_slice(&(counts.len() as u32).to_le_bytes());
            for (item, n) in counts {
                p.extend_from_slice(&item.to_le_bytes());
                p.extend_from_slice(&n.to_le_bytes());
            }
        }
        Record::Keys(keys) => {
            p.push(KIND_KEYS);
            p.extend_from_slice(&(keys.len() as u32).to_le_bytes());
            for (k, n) in keys {
                p.extend_from_slice(&(k.len() as u16).to_le_bytes());
                p.extend_from_slice(k.as_bytes());
                p.extend_from_slice(&n.to_le_bytes());
            }
        }
    }
    frame(p)
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn string(&mut self, len: usize) -> Option<String> {
        String::from_utf8(self.bytes(len)?.to_vec()).ok()
    }
    /// A count of items of at least `size` bytes each, checked against what is left.
    fn count(&mut self, size: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n.checked_mul(size)? <= self.0.len()).then_some(n)
    }
}

/// Decodes a payload whose checksum matched. `None` means it does not parse (a bug or damage
/// that happened to keep the checksum).
pub fn decode(payload: &[u8]) -> Option<Record> {
    let mut c = Cursor(payload);
    let head = c.u32()?;
    let record = if head & STATE != 0 {
        let [kind] = c.take()?;
        match kind {
            KIND_SEEN => {
                let user_id = c.u64()?;
                let n = c.count(8)?;
                let items = (0..n).map(|_| c.u64()).collect::<Option<_>>()?;
                Record::Seen { user_id, items }
            }
            KIND_COUNTS => {
                let n = c.count(16)?;
                let counts = (0..n)
                    .map(|_| Some((c.u64()?, c.u64()?)))
                    .collect::<Option<_>>()?;
                Record::Counts(counts)
            }
            KIND_KEYS => {
                let n = c.count(10)?;
                let keys = (0..n)
                    .map(|_| {
                        let len = c.u16()? as usize;
                        Some((c.string(len)?, c.u64()?))
                    })
                    .collect::<Option<_>>()?;
                Record::Keys(keys)
            }
            _ => return None,
        }
    } else {
        let key = if head & KEYED != 0 {
            let len = c.u16()? as usize;
            Some(c.string(len)?)
        } else {
            None
        };
        let n = (head & !KEYED) as usize;
        let mut events = Vec::with_capacity(n.min(payload.len() / 18));
        for _ in 0..n {
            events.push(decode_event(&mut c)?);
        }
        Record::Batch { events, key }
    };
    c.0.is_empty().then_some(record)
}

fn decode_event(c: &mut Cursor) -> Option<Event> {
    let user_id = c.u64()?;
    let ts_ms = i64::from_le_bytes(c.take()?);
    let [code] = c.take()?;
    let event_type = *EventType::ALL.get((code as usize).checked_sub(1)?)?;
    let [flags] = c.take()?;
    let item_id = if flags & HAS_ITEM != 0 {
        Some(c.u64()?)
    } else {
        None
    };
    let query = if flags & HAS_QUERY != 0 {
        let len = c.u32()? as usize;
        Some(c.string(len)?)
    } else {
        None
    };
    let value = if flags & HAS_VALUE != 0 {
        Some(f32::from_le_bytes(c.take()?))
    } else {
        None
    };
    Some(Event {
        user_id,
        ts_ms,
        event_type,
        item_id,
        query,
        value,
    })
}

/// The length field of a record header, if it is within the limit.
pub fn payload_len(header: &[u8; 8]) -> Option<usize> {
    let len = u32::from_le_bytes(header[..4].try_into().ok()?);
    (len <= MAX_RECORD).then_some(len as usize)
}

/// The record starting at byte `at` of `bytes` and where it ends; `None` for anything that is
/// not a whole valid record (too short, a length past the limit or the end, a checksum or parse
/// failure). An all-zero region is never valid: an empty payload cannot hold its head.
pub fn record_at(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let rest = bytes.get(at..)?;
    let header: &[u8; 8] = rest.get(..8)?.try_into().ok()?;
    let len = payload_len(header)?;
    let payload = rest.get(8..8 + len)?;
    check(header, payload).map(|r| (r, at + 8 + len))
}

/// Checks a record read as a header and payload.
pub fn check(header: &[u8; 8], payload: &[u8]) -> Option<Record> {
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    (crc32fast::hash(payload) == crc)
        .then(|| decode(payload))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_kind_round_trips() {
        let events = vec![
            Event {
                user_id: 3,
                ts_ms: 1000,
                event_type: EventType::Search,
                item_id: None,
                query: Some("red shoes".into()),
                value: None,
            },
            Event {
                user_id: 3,
                ts_ms: 1001,
                event_type: EventType::Rate,
                item_id: Some(77),
                query: None,
                value: Some(4.5),
            },
        ];
        let records = [
            Record::Batch {
                events: events.clone(),
                key: None,
            },
            Record::Batch {
                events,
                key: Some("k-1".into()),
            },
            Record::Seen {
                user_id: 9,
                items: vec![1, 2, 3],
            },
            Record::Counts(vec![(5, 10), (6, 1)]),
            Record::Keys(vec![("a".into(), 2), (String::new(), 0)]),
        ];
        let mut bytes = Vec::new();
        for r in &records {
            bytes.extend(encode_state(r));
        }
        let mut at = 0;
        for r in &records {
            let (got, end) = record_at(&bytes, at).unwrap();
            assert_eq!(&got, r);
            at = end;
        }
        assert_eq!(at, bytes.len());
        assert!(record_at(&[0; 64], 0).is_none(), "zeros are no record");
    }
}
