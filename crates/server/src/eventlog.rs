//! The append-only event log that makes `RecordEvents` durable.
//!
//! Layout: an 8-byte magic, then records. A record is `len: u32 LE`, `crc32: u32 LE` of the
//! payload, and the payload: one `RecordEvents` batch (`count: u32`, then each event). One record
//! per batch, so a crash loses a whole unacknowledged batch or nothing of it. A batch sent with
//! an idempotency key sets the count's top bit and stores the key (`len: u16`, bytes) before
//! the events, so the deduplication window survives a restart; older logs read unchanged.
//!
//! On start-up the log is replayed. Damage with no valid record after it is a torn tail — a
//! record cut short by a crash, or garbage a power loss left where the last record was being
//! written (zeros, a nonsense length) — and is cut back to the last valid record, logged with
//! the byte count and counted in a metric. Damage followed by a valid record is corruption, and
//! start-up refuses it rather than silently dropping acknowledged events.
//!
//! The open log holds an exclusive lock on the file: two servers appending at their own offsets
//! would overwrite each other's acknowledged events, so the second one fails at start-up.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use features::{Event, EventType};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"TTEVLOG1";
const HEADER: u64 = 8;
/// Larger length fields are treated as damage rather than allocated.
const MAX_RECORD: u32 = 256 << 20;

const HAS_ITEM: u8 = 1;
const HAS_QUERY: u8 = 2;
const HAS_VALUE: u8 = 4;
/// Top bit of a record's event count: an idempotency key follows the count.
const KEYED: u32 = 1 << 31;

/// Encodes a batch of events, with its idempotency key if it has one, as one record (length,
/// checksum, payload). Keys are at most [`crate::dedup::MAX_KEY_BYTES`] long.
pub fn encode_record(events: &[Event], key: Option<&str>) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + events.len() * 32);
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
    let len = (p.len() - 8) as u32;
    let crc = crc32fast::hash(&p[8..]);
    p[..4].copy_from_slice(&len.to_le_bytes());
    p[4..8].copy_from_slice(&crc.to_le_bytes());
    p
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
}

/// A decoded record: its events and idempotency key.
struct Decoded {
    events: Vec<Event>,
    key: Option<String>,
}

/// Decodes a payload whose checksum matched. `None` means it does not parse (a bug or damage
/// that happened to keep the checksum).
fn decode_payload(payload: &[u8]) -> Option<Decoded> {
    let mut c = Cursor(payload);
    let count = u32::from_le_bytes(c.take()?);
    let key = if count & KEYED != 0 {
        let len = u16::from_le_bytes(c.take()?) as usize;
        Some(String::from_utf8(c.bytes(len)?.to_vec()).ok()?)
    } else {
        None
    };
    let n = (count & !KEYED) as usize;
    let mut out = Vec::with_capacity(n.min(payload.len() / 18));
    for _ in 0..n {
        let user_id = u64::from_le_bytes(c.take()?);
        let ts_ms = i64::from_le_bytes(c.take()?);
        let [code] = c.take()?;
        let event_type = *EventType::ALL.get((code as usize).checked_sub(1)?)?;
        let [flags] = c.take()?;
        let item_id = (flags & HAS_ITEM != 0)
            .then(|| c.take().map(u64::from_le_bytes))
            .map_or(Some(None), |v| v.map(Some))?;
        let query = if flags & HAS_QUERY != 0 {
            let len = u32::from_le_bytes(c.take()?) as usize;
            Some(String::from_utf8(c.bytes(len)?.to_vec()).ok()?)
        } else {
            None
        };
        let value = (flags & HAS_VALUE != 0)
            .then(|| c.take().map(f32::from_le_bytes))
            .map_or(Some(None), |v| v.map(Some))?;
        out.push(Event {
            user_id,
            ts_ms,
            event_type,
            item_id,
            query,
            value,
        });
    }
    c.0.is_empty().then_some(Decoded { events: out, key })
}

/// The events of a valid record starting at byte `at` of the log, and where it ends; `None` for
/// anything else (too short, a length past the limit or the end, a checksum or parse failure).
/// An all-zero region is never valid: an empty payload cannot hold its event count.
fn record_at(bytes: &[u8], at: usize) -> Option<(Decoded, usize)> {
    let rest = bytes.get(at..)?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(rest.get(4..8)?.try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let end = 8 + len as usize;
    let payload = rest.get(8..end)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    decode_payload(payload).map(|d| (d, at + end))
}

/// What replay found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replay {
    pub records: u64,
    pub events: u64,
    /// Bytes of a torn last record that were cut off.
    pub truncated_bytes: u64,
}

/// The open log, positioned at its end for appends.
pub struct EventLog {
    file: File,
    path: PathBuf,
    len: u64,
}

impl EventLog {
    /// Opens (or creates) the log, replays it through `apply` (each event) and `keyed` (each
    /// idempotency key with its batch's event count), and truncates a torn tail.
    pub fn open(
        path: &Path,
        mut apply: impl FnMut(Event),
        mut keyed: impl FnMut(&str, u64),
    ) -> Result<(EventLog, Replay)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let io = |e| Error::io(path, e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::BadFile {
                    path: path.to_path_buf(),
                    reason: "another server holds this event log (it is locked); give each server its own --event-log, or share history through an event bus".into(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let bad = |reason: String| Error::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < MAGIC.len() {
            if !MAGIC.starts_with(&bytes) {
                return Err(bad("not a twotower event log (bad magic)".into()));
            }
            // New, or torn while writing the magic.
            file.set_len(0).map_err(io)?;
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            file.write_all(MAGIC).map_err(io)?;
            file.sync_all().map_err(io)?;
            features::fsutil::sync_parent(path)?;
            return Ok((
                EventLog {
                    file,
                    path: path.to_path_buf(),
                    len: HEADER,
                },
                Replay::default(),
            ));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a twotower event log (bad magic)".into()));
        }
        let mut replay = Replay::default();
        let mut at = HEADER as usize;
        while at < bytes.len() {
            match record_at(&bytes, at) {
                Some((Decoded { events, key }, end)) => {
                    replay.records += 1;
                    replay.events += events.len() as u64;
                    if let Some(k) = key {
                        keyed(&k, events.len() as u64);
                    }
                    events.into_iter().for_each(&mut apply);
                    at = end;
                }
                None => {
                    if let Some(next) =
                        (at + 1..bytes.len()).find(|&p| record_at(&bytes, p).is_some())
                    {
                        return Err(bad(format!(
                            "damaged record at byte {at}, followed by a valid record at byte {next} ({} bytes after the damage); refusing to drop acknowledged events (move the file aside to start without it)",
                            bytes.len() - at
                        )));
                    }
                    replay.truncated_bytes = (bytes.len() - at) as u64;
                    break;
                }
            }
        }
        if replay.truncated_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = replay.truncated_bytes,
                "event log ends in a torn or garbage record (a crash or power loss while writing); cutting it back to the last valid record"
            );
            file.set_len(at as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::Start(at as u64)).map_err(io)?;
        Ok((
            EventLog {
                file,
                path: path.to_path_buf(),
                len: at as u64,
            },
            replay,
        ))
    }

    /// Appends encoded records and fsyncs them: when this returns `Ok`, they survive a crash.
    /// On failure the file is cut back to where it was, so later appends stay readable.
    pub fn append(&mut self, records: &[u8]) -> Result<()> {
        let written = self
            .file
            .write_all(records)
            .and_then(|_| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += records.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self
                    .file
                    .set_len(self.len)
                    .and_then(|_| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()));
                Err(Error::io(&self.path, e))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(n: u64) -> Vec<Event> {
        (0..n)
            .map(|i| Event {
                user_id: i,
                ts_ms: 1000 + i as i64,
                event_type: if i % 3 == 0 {
                    EventType::Search
                } else {
                    EventType::Purchase
                },
                item_id: (i % 3 != 0).then_some(i * 7),
                query: (i % 3 == 0).then(|| format!("red shoes {i}")),
                value: (i % 2 == 0).then_some(i as f32 / 2.0),
            })
            .collect()
    }

    fn replay(path: &Path) -> Result<(Vec<Event>, Replay)> {
        let mut got = Vec::new();
        let (_, r) = EventLog::open(path, |e| got.push(e), |_, _| {})?;
        Ok((got, r))
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state/events.log");
        let (mut log, r) = EventLog::open(&path, |_| panic!("empty"), |_, _| {}).unwrap();
        assert_eq!(r, Replay::default());
        let (a, b) = (events(5), events(3));
        log.append(&encode_record(&a, None)).unwrap();
        log.append(&encode_record(&b, None)).unwrap();
        drop(log);
        let (got, r) = replay(&path).unwrap();
        assert_eq!(got, [a.clone(), b.clone()].concat());
        assert_eq!((r.records, r.events, r.truncated_bytes), (2, 8, 0));

        // A crash in the middle of the next append: every cut point loses only that record.
        let full = std::fs::read(&path).unwrap();
        let c = encode_record(&events(4), None);
        for cut in 1..c.len() {
            let mut bytes = full.clone();
            bytes.extend_from_slice(&c[..cut]);
            std::fs::write(&path, &bytes).unwrap();
            let (got, r) = replay(&path).unwrap();
            assert_eq!(got.len(), 8, "cut at {cut}");
            assert_eq!(r.truncated_bytes, cut as u64);
            assert_eq!(std::fs::read(&path).unwrap(), full, "truncated back");
        }
    }

    #[test]
    fn corruption_before_the_tail_is_refused_not_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.log");
        let (mut log, _) = EventLog::open(&path, |_| {}, |_, _| {}).unwrap();
        log.append(&encode_record(&events(2), None)).unwrap();
        log.append(&encode_record(&events(2), None)).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER as usize + 12] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = replay(&path).unwrap_err().to_string();
        assert!(err.contains("damaged record at byte 8"), "{err}");
        std::fs::write(&path, b"garbage!garbage").unwrap();
        assert!(replay(&path).unwrap_err().to_string().contains("magic"));
    }

    #[test]
    fn a_garbage_length_in_the_last_record_is_cut_as_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.log");
        let (mut log, _) = EventLog::open(&path, |_| {}, |_, _| {}).unwrap();
        log.append(&encode_record(&events(3), None)).unwrap();
        log.append(&encode_record(&events(2), None)).unwrap();
        drop(log);
        let good = std::fs::read(&path).unwrap();
        // What a power loss can leave: a length field far past the limit, then junk.
        let mut junk = u32::MAX.to_le_bytes().to_vec();
        junk.extend_from_slice(&[0xab; 37]);
        std::fs::write(&path, [good.clone(), junk.clone()].concat()).unwrap();
        let (got, r) = replay(&path).unwrap();
        assert_eq!(got.len(), 5);
        assert_eq!(r.truncated_bytes, junk.len() as u64);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            good,
            "cut back to the last valid record"
        );
        // Appends after the cut replay too.
        let (mut log, _) = EventLog::open(&path, |_| {}, |_, _| {}).unwrap();
        log.append(&encode_record(&events(1), None)).unwrap();
        drop(log);
        assert_eq!(replay(&path).unwrap().0.len(), 6);
    }

    #[test]
    fn a_garbage_length_followed_by_valid_records_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.log");
        let (mut log, _) = EventLog::open(&path, |_| {}, |_, _| {}).unwrap();
        log.append(&encode_record(&events(2), None)).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let damaged_at = bytes.len();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0xab; 9]);
        bytes.extend_from_slice(&encode_record(&events(4), None));
        std::fs::write(&path, &bytes).unwrap();
        let err = replay(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("damaged record at byte {damaged_at}"))
                && err.contains(&format!("valid record at byte {}", damaged_at + 13)),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing cut");
    }

    #[test]
    fn a_second_server_on_one_event_log_fails_at_start_up() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.log");
        let (mut first, _) = EventLog::open(&path, |_| {}, |_, _| {}).unwrap();
        first.append(&encode_record(&events(2), None)).unwrap();
        let err = EventLog::open(&path, |_| {}, |_, _| {})
            .err()
            .expect("second open must fail");
        let err = err.to_string();
        assert!(
            err.contains("events.log") && err.contains("another server"),
            "{err}"
        );
        first.append(&encode_record(&events(1), None)).unwrap();
        drop(first);
        // Once the first one is gone, the log opens with every acknowledged event.
        assert_eq!(replay(&path).unwrap().0.len(), 3);
    }

    #[test]
    fn idempotency_keys_round_trip_beside_unkeyed_records() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.log");
        let (mut log, _) = EventLog::open(&path, |_| {}, |_, _| {}).unwrap();
        log.append(&encode_record(&events(2), None)).unwrap();
        log.append(&encode_record(&events(3), Some("batch-7")))
            .unwrap();
        log.append(&encode_record(&events(1), Some(""))).unwrap();
        drop(log);
        let (mut got, mut keys) = (Vec::new(), Vec::new());
        let (_, r) =
            EventLog::open(&path, |e| got.push(e), |k, n| keys.push((k.to_string(), n))).unwrap();
        assert_eq!((got.len(), r.records), (6, 3));
        assert_eq!(got[2..5], events(3)[..]);
        assert_eq!(keys, [("batch-7".to_string(), 3), (String::new(), 1)]);
    }
}
