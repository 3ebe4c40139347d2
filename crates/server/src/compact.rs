//! Event-log compaction: the log is rewritten as the state it produces, so disk use and
//! restart time stay bounded by the number of users instead of growing with every event.
//!
//! The compacted log holds, per user, the most recent events the history store keeps (at
//! least [`MIN_KEPT_EVENTS`], so a retrained model with a longer history still finds them), a
//! state record with the user's other seen items (so `exclude_seen` stays exact), one with the
//! interaction counts of the dropped events (so popularity is unchanged) and the idempotency
//! window. Replaying it after the prepared data gives the same history store, counts and
//! window as replaying the whole log: a kept event list is a suffix of the full one in the
//! store's own order, and merging a suffix with the seed data keeps the same last L events.
//!
//! It runs on a thread of its own over a read-only handle, covering the log up to where it was
//! when it started; the event-log writer then copies what was appended meanwhile and swaps the
//! file in ([`EventLog::replace`]). Acknowledged events are in the old file or the new one at
//! every moment.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use features::splits::{HistoryProtocol, TieOrder};
use features::Event;

use crate::dedup::DedupWindow;
use crate::error::{Error, Result};
use crate::eventlog::{self, EventLog, HEADER, MAGIC};
use crate::history::{HistoryStore, StoredEvent};
use crate::logrecord::{encode_batch, encode_state, Record};
use crate::seed;

/// Events per user a compacted log keeps at least: what training examples keep at most.
pub const MIN_KEPT_EVENTS: usize = 50;
/// Entries per counts or keys record (records stay far below the record size limit).
const CHUNK: usize = 100_000;

/// How the history store keeps events, which compaction must reproduce.
#[derive(Debug, Clone, Copy)]
pub struct CompactSettings {
    /// Events kept per user (the store's bound, at least [`MIN_KEPT_EVENTS`]).
    pub keep: usize,
    pub ties: TieOrder,
    pub protocol: HistoryProtocol,
    /// Idempotency keys kept.
    pub window: usize,
}

/// A compacted log, written and fsynced beside the live one, not yet swapped in.
pub struct Compacted {
    pub file: File,
    pub staged: PathBuf,
    /// Bytes of the live log it stands for.
    pub covers: u64,
    /// Its own length.
    pub len: u64,
    pub users: usize,
    pub seconds: f64,
}

impl Compacted {
    /// Swaps it in for `log`'s file (copying what was appended since it started).
    pub fn swap_into(self, log: &mut EventLog) -> Result<()> {
        let before = log.len();
        let (covers, len, seconds, users) = (self.covers, self.len, self.seconds, self.users);
        let staged = self.staged.clone();
        log.replace(self.file, &staged, covers).inspect_err(|_| {
            let _ = std::fs::remove_file(&staged);
        })?;
        tracing::info!(
            path = %log.path().display(),
            bytes_before = before,
            bytes_after = log.len(),
            compacted_bytes = len,
            users,
            seconds,
            "event log compacted"
        );
        Ok(())
    }
}

/// Everything the covered records say, accumulated.
struct State {
    store: HistoryStore,
    counts: HashMap<u64, u64>,
    dedup: DedupWindow,
}

impl State {
    /// Applies a record exactly as a replay at start-up would.
    fn apply(&mut self, record: Record) {
        seed::apply_record(&self.store, Some(&mut self.counts), &mut self.dedup, record)
    }
}

fn to_event(user_id: u64, e: &StoredEvent) -> Event {
    Event {
        user_id,
        ts_ms: e.ts_ms,
        event_type: e.event_type,
        item_id: e.item_id,
        query: e.query.as_deref().map(str::to_string),
        value: None,
    }
}

/// Compacts the first `covers` bytes (whole records) of the log at `path` into a staged file
/// beside it. Reads through its own handle; the live log may keep growing meanwhile.
pub fn compact(path: &Path, covers: u64, settings: &CompactSettings) -> Result<Compacted> {
    let started = Instant::now();
    let io = |e| Error::io(path, e);
    let mut file = File::open(path).map_err(io)?;
    file.seek(SeekFrom::Start(HEADER)).map_err(io)?;
    let mut state = State {
        store: HistoryStore::new(settings.keep, settings.ties, settings.protocol),
        counts: HashMap::new(),
        dedup: DedupWindow::new(settings.window),
    };
    let (_, at) = eventlog::replay_records(&file, covers, path, &mut |r| state.apply(r))?;
    if at != covers {
        return Err(Error::Mismatch(format!(
            "{}: compaction expected whole records up to byte {covers}, found damage at byte {at}",
            path.display()
        )));
    }
    let staged = features::fsutil::hidden_sibling(path, "compact");
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&staged)
        .map_err(|e| Error::io(&staged, e))?;
    let written = write_state(out, state).and_then(|(mut out, users)| {
        out.sync_all()?;
        let len = out.stream_position()?;
        Ok((out, users, len))
    });
    match written {
        Ok((file, users, len)) => Ok(Compacted {
            file,
            staged,
            covers,
            len,
            users,
            seconds: started.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            Err(Error::io(&staged, e))
        }
    }
}

fn write_state(file: File, state: State) -> std::io::Result<(File, usize)> {
    let State {
        store,
        mut counts,
        dedup,
    } = state;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(MAGIC)?;
    let mut result: std::io::Result<()> = Ok(());
    let mut users = 0;
    store.for_each_user(|user_id, recent, seen| {
        if result.is_err() {
            return;
        }
        users += 1;
        let events: Vec<Event> = recent.iter().map(|e| to_event(user_id, e)).collect();
        let mut kept = HashSet::new();
        for id in events.iter().filter_map(|e| e.item_id) {
            kept.insert(id);
            if let Some(n) = counts.get_mut(&id) {
                *n = n.saturating_sub(1);
            }
        }
        let others: Vec<u64> = seen.iter().filter(|i| !kept.contains(i)).collect();
        result = (|| {
            if !events.is_empty() {
                out.write_all(&encode_batch(&events, None))?;
            }
            for items in others.chunks(CHUNK) {
                let items = items.to_vec();
                out.write_all(&encode_state(&Record::Seen { user_id, items }))?;
            }
            Ok(())
        })();
    });
    result?;
    let mut counts: Vec<(u64, u64)> = counts.into_iter().filter(|&(_, n)| n > 0).collect();
    counts.sort_unstable();
    for chunk in counts.chunks(CHUNK) {
        out.write_all(&encode_state(&Record::Counts(chunk.to_vec())))?;
    }
    let keys: Vec<(String, u64)> = dedup.entries().map(|(k, n)| (k.to_string(), n)).collect();
    for chunk in keys.chunks(CHUNK) {
        out.write_all(&encode_state(&Record::Keys(chunk.to_vec())))?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    Ok((file, users))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventlog::encode_record;
    use features::EventType;

    fn settings() -> CompactSettings {
        CompactSettings {
            keep: 3,
            ties: TieOrder::ItemId,
            protocol: HistoryProtocol::Strict,
            window: 4,
        }
    }

    /// A replayed state, comparable: users (events, sorted seen items), counts, keys.
    type Comparable = (
        Vec<(u64, Vec<StoredEvent>, Vec<u64>)>,
        Vec<(u64, u64)>,
        Vec<(String, u64)>,
    );

    /// Replays a log into a fresh state, as a server does after its seed data.
    fn state_of(path: &Path) -> Comparable {
        let mut state = State {
            store: HistoryStore::new(2, TieOrder::ItemId, HistoryProtocol::Strict),
            counts: HashMap::new(),
            dedup: DedupWindow::new(4),
        };
        let (log, _) = EventLog::open(path, &mut |r| state.apply(r)).unwrap();
        drop(log);
        let mut users = Vec::new();
        state.store.for_each_user(|u, recent, seen| {
            let seen: Vec<u64> = seen.iter().collect();
            users.push((u, recent.iter().cloned().collect(), seen));
        });
        users.sort_by_key(|u| u.0);
        let mut counts: Vec<_> = state.counts.into_iter().collect();
        counts.sort();
        let keys = state
            .dedup
            .entries()
            .map(|(k, n)| (k.to_string(), n))
            .collect();
        (users, counts, keys)
    }

    fn batch(user: u64, first_ts: i64, items: &[u64]) -> Vec<Event> {
        items
            .iter()
            .enumerate()
            .map(|(i, &id)| Event {
                user_id: user,
                ts_ms: first_ts + i as i64,
                event_type: EventType::View,
                item_id: Some(id),
                query: None,
                value: Some(1.0),
            })
            .collect()
    }

    #[test]
    fn a_compacted_log_replays_to_the_same_state_and_appends_during_compaction_survive() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.log");
        let (mut log, _) = EventLog::open(&path, &mut |_: Record| {}).unwrap();
        for round in 0..40u64 {
            let user = round % 3;
            let items: Vec<u64> = (0..5).map(|i| (round * 7 + i) % 23).collect();
            let key = format!("k{round}");
            log.append(&encode_record(
                &batch(user, round as i64 * 10, &items),
                (round % 2 == 0).then_some(key.as_str()),
            ))
            .unwrap();
        }
        let search = Event {
            user_id: 1,
            ts_ms: 5,
            event_type: EventType::Search,
            item_id: None,
            query: Some("red shoes".into()),
            value: None,
        };
        log.append(&encode_record(&[search], None)).unwrap();
        let covers = log.len();
        let compacted = compact(&path, covers, &settings()).unwrap();
        assert!(compacted.len < covers, "{} !< {covers}", compacted.len);
        // Appended while compaction ran: copied over by the swap.
        log.append(&encode_record(&batch(7, 1000, &[99, 98]), Some("late")))
            .unwrap();
        let copy = tmp.path().join("uncompacted.log");
        std::fs::copy(&path, &copy).unwrap();
        compacted.swap_into(&mut log).unwrap();
        // The swapped-in log is the live one: appends after the swap land in it.
        log.append(&encode_record(&batch(8, 2000, &[5]), None))
            .unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&copy)
            .unwrap()
            .write_all(&encode_record(&batch(8, 2000, &[5]), None))
            .unwrap();
        drop(log);
        assert!(std::fs::metadata(&path).unwrap().len() < std::fs::metadata(&copy).unwrap().len());
        assert_eq!(state_of(&path), state_of(&copy));
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
