//! The append-only event log that makes `RecordEvents` durable.
//!
//! Layout: an 8-byte magic, then records ([`crate::logrecord`]). One record per batch, so a
//! crash loses a whole unacknowledged batch or nothing of it.
//!
//! On start-up the log is replayed, streaming: memory holds one record at a time, not the file.
//! Damage with no valid record after it is a torn tail — a record cut short by a crash, or
//! garbage a power loss left where the last record was being written (zeros, a nonsense length)
//! — and is cut back to the last valid record, logged with the byte count and counted in a
//! metric. Damage followed by a valid record is corruption, and start-up refuses it rather than
//! silently dropping acknowledged events.
//!
//! The open log holds an exclusive lock on the file: two servers appending at their own offsets
//! would overwrite each other's acknowledged events, so the second one fails at start-up.
//! Compaction ([`crate::compact`]) replaces the file with a shorter one holding the same state;
//! [`EventLog::replace`] swaps it in under the same lock.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::logrecord::{self, Record};

pub use crate::logrecord::encode_batch as encode_record;

/// The first bytes of every event log.
pub const MAGIC: &[u8; 8] = b"TTEVLOG1";
/// Bytes before the first record.
pub const HEADER: u64 = 8;

/// Where replay delivers each valid record, in log order.
pub trait ReplaySink {
    fn record(&mut self, record: Record);
}

impl<F: FnMut(Record)> ReplaySink for F {
    fn record(&mut self, record: Record) {
        self(record)
    }
}

/// What replay found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replay {
    pub records: u64,
    /// Events in batch records.
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

fn lock(file: &File, path: &Path) -> Result<()> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::BadFile {
            path: path.to_path_buf(),
            reason: "another server holds this event log (it is locked); give each server its own --event-log, or share history through an event bus".into(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, e)),
    }
}

/// Reads `n` bytes, or `None` at a short read (the end of the file).
fn read_exact_or_end(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => return Ok(false),
            n => filled += n,
        }
    }
    Ok(true)
}

/// Replays the records of `file` (positioned after the magic) into `sink`. Returns the replay
/// summary and the offset of the first byte that is not part of a valid record.
pub(crate) fn replay_records(
    file: &File,
    size: u64,
    path: &Path,
    sink: &mut impl ReplaySink,
) -> Result<(Replay, u64)> {
    let io = |e| Error::io(path, e);
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut replay = Replay::default();
    let mut at = HEADER;
    let mut header = [0u8; 8];
    let mut payload = Vec::new();
    while at < size {
        if !read_exact_or_end(&mut reader, &mut header).map_err(io)? {
            break;
        }
        let Some(len) = logrecord::payload_len(&header) else {
            break;
        };
        if at + 8 + len as u64 > size {
            break;
        }
        payload.resize(len, 0);
        if !read_exact_or_end(&mut reader, &mut payload).map_err(io)? {
            break;
        }
        let Some(record) = logrecord::check(&header, &payload) else {
            break;
        };
        replay.records += 1;
        if let Record::Batch { events, .. } = &record {
            replay.events += events.len() as u64;
        }
        sink.record(record);
        at += 8 + len as u64;
    }
    Ok((replay, at))
}

impl EventLog {
    /// Opens (or creates) the log, replays it into `sink`, and cuts a torn tail.
    pub fn open(path: &Path, sink: &mut impl ReplaySink) -> Result<(EventLog, Replay)> {
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
        lock(&file, path)?;
        let bad = |reason: String| Error::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let size = file.metadata().map_err(io)?.len();
        let mut magic = Vec::with_capacity(8);
        (&file).take(HEADER).read_to_end(&mut magic).map_err(io)?;
        if size < HEADER {
            if !MAGIC.starts_with(&magic) {
                return Err(bad("not a twotower event log (bad magic)".into()));
            }
            // New, or torn while writing the magic.
            file.set_len(0).map_err(io)?;
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            file.write_all(MAGIC).map_err(io)?;
            file.sync_all().map_err(io)?;
            features::fsutil::sync_parent(path)?;
            let log = EventLog {
                file,
                path: path.to_path_buf(),
                len: HEADER,
            };
            return Ok((log, Replay::default()));
        }
        if magic != MAGIC {
            return Err(bad("not a twotower event log (bad magic)".into()));
        }
        let (mut replay, at) = replay_records(&file, size, path, sink)?;
        if at < size {
            // Damage at `at`: a torn tail unless a valid record follows somewhere after it.
            file.seek(SeekFrom::Start(at)).map_err(io)?;
            let mut rest = Vec::new();
            (&file).read_to_end(&mut rest).map_err(io)?;
            if let Some(next) = (1..rest.len()).find(|&p| logrecord::record_at(&rest, p).is_some())
            {
                return Err(bad(format!(
                    "damaged record at byte {at}, followed by a valid record at byte {} ({} bytes after the damage); refusing to drop acknowledged events (move the file aside to start without it)",
                    at + next as u64,
                    rest.len()
                )));
            }
            replay.truncated_bytes = size - at;
            tracing::warn!(
                path = %path.display(),
                bytes = replay.truncated_bytes,
                "event log ends in a torn or garbage record (a crash or power loss while writing); cutting it back to the last valid record"
            );
            file.set_len(at).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::Start(at)).map_err(io)?;
        let log = EventLog {
            file,
            path: path.to_path_buf(),
            len: at,
        };
        Ok((log, replay))
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

    /// Swaps in a compacted log: `compacted` (a complete log file at `staged`, beside this one)
    /// holds the state of this log's first `covers` bytes. The records appended since are copied
    /// after it, then it is locked, fsynced and renamed over this log's path. Either the old or
    /// the new file is the log at every moment, and both hold every acknowledged event.
    pub fn replace(&mut self, mut compacted: File, staged: &Path, covers: u64) -> Result<()> {
        let io = |e| Error::io(staged, e);
        lock(&compacted, staged)?;
        self.file
            .seek(SeekFrom::Start(covers))
            .map_err(|e| Error::io(&self.path, e))?;
        let copied =
            std::io::copy(&mut (&self.file).take(self.len - covers), &mut compacted).map_err(io)?;
        self.file
            .seek(SeekFrom::Start(self.len))
            .map_err(|e| Error::io(&self.path, e))?;
        if copied != self.len - covers {
            return Err(Error::Mismatch(format!(
                "{}: copied {copied} of {} bytes appended during compaction",
                self.path.display(),
                self.len - covers
            )));
        }
        compacted.sync_all().map_err(io)?;
        let len = compacted.stream_position().map_err(io)?;
        std::fs::rename(staged, &self.path).map_err(|e| Error::io(&self.path, e))?;
        features::fsutil::sync_parent(&self.path)?;
        self.file = compacted;
        self.len = len;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the log, header included.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log holds no record.
    pub fn is_empty(&self) -> bool {
        self.len <= HEADER
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use features::{Event, EventType};

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

    /// The events of a log's batch records, in order, and the replay summary.
    fn replay(path: &Path) -> Result<(Vec<Event>, Replay)> {
        let mut got = Vec::new();
        let (_, r) = EventLog::open(path, &mut |rec| {
            if let Record::Batch { events, .. } = rec {
                got.extend(events)
            }
        })?;
        Ok((got, r))
    }

    fn nothing(_: Record) {}

    #[test]
    fn records_round_trip_and_a_torn_tail_is_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state/events.log");
        let (mut log, r) = EventLog::open(&path, &mut |_: Record| panic!("empty")).unwrap();
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
        let (mut log, _) = EventLog::open(&path, &mut nothing).unwrap();
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
        let (mut log, _) = EventLog::open(&path, &mut nothing).unwrap();
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
        let (mut log, _) = EventLog::open(&path, &mut nothing).unwrap();
        log.append(&encode_record(&events(1), None)).unwrap();
        drop(log);
        assert_eq!(replay(&path).unwrap().0.len(), 6);
    }

    #[test]
    fn a_garbage_length_followed_by_valid_records_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.log");
        let (mut log, _) = EventLog::open(&path, &mut nothing).unwrap();
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
        let (mut first, _) = EventLog::open(&path, &mut nothing).unwrap();
        first.append(&encode_record(&events(2), None)).unwrap();
        let err = EventLog::open(&path, &mut nothing)
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
        let (mut log, _) = EventLog::open(&path, &mut nothing).unwrap();
        log.append(&encode_record(&events(2), None)).unwrap();
        log.append(&encode_record(&events(3), Some("batch-7")))
            .unwrap();
        log.append(&encode_record(&events(1), Some(""))).unwrap();
        drop(log);
        let (mut got, mut keys) = (Vec::new(), Vec::new());
        let (_, r) = EventLog::open(&path, &mut |rec| {
            if let Record::Batch { events, key } = rec {
                if let Some(k) = key {
                    keys.push((k, events.len() as u64));
                }
                got.extend(events);
            }
        })
        .unwrap();
        assert_eq!((got.len(), r.records), (6, 3));
        assert_eq!(got[2..5], events(3)[..]);
        assert_eq!(keys, [("batch-7".to_string(), 3), (String::new(), 1)]);
    }
}
