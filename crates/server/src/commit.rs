//! Group commit: one writer thread makes `RecordEvents` batches durable together.
//!
//! Requests hand their events to the writer and wait. The writer takes every batch that is
//! waiting, appends them to the event log in one write, fsyncs once, applies them to the history
//! store, and only then acknowledges each request. One fsync thus covers many concurrent
//! requests (the fsync, not the write, is what costs), and an acknowledged event is both durable
//! and visible to the next `Recommend`.
//!
//! Idempotency keys are checked here, on the one thread that commits, so a retry racing its own
//! first attempt is still recorded once: a repeat of a committed key is answered at once, and a
//! repeat of a key earlier in the same group gets that batch's outcome. So is `max_users`, exactly
//! (`userlimit.rs`): batches checked together as they arrived could pass it between them.

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use features::Event;
use tokio::sync::oneshot;

use crate::compact::{self, CompactSettings, Compacted};
use crate::dedup::{batch_digest, DedupWindow, KeySeen};
use crate::eventlog::{encode_record, EventLog};
use crate::history::{HistoryStore, StoredEvent};
use crate::metrics::Metrics;
use crate::userlimit::UserLimit;

/// Most bytes written per fsync; a backlog larger than this is committed in several rounds.
const MAX_COMMIT_BYTES: usize = 8 << 20;
/// How often an idle writer looks whether a background compaction finished.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// When and how the writer compacts the log in the background.
#[derive(Debug, Clone, Copy)]
pub struct AutoCompaction {
    pub settings: CompactSettings,
    /// Compact when the log is past this many bytes and has doubled since the last time.
    pub threshold: u64,
}

/// What a committed batch reports: events recorded, and whether it repeated a recorded key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub events: u64,
    pub duplicate: bool,
}

/// Why a batch was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The log or the bus could not take it; a retry may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// Its idempotency key was recorded with other events: acknowledging it as a repeat would
    /// drop it silently.
    #[error(
        "idempotency_key: `{0}` was already used for a different batch (within the last \
         idempotency_window keys); a retry must send the same events, and a new batch a new key"
    )]
    KeyReused(String),
    /// It adds users past `max_users`.
    #[error("{0}")]
    UserLimit(String),
}

impl From<String> for RecordError {
    fn from(reason: String) -> Self {
        RecordError::Unavailable(reason)
    }
}

struct Pending {
    record: Vec<u8>,
    events: Vec<Event>,
    key: Option<String>,
    /// [`batch_digest`] of `events`, for a keyed batch.
    digest: u64,
    ack: oneshot::Sender<Result<Recorded, RecordError>>,
}

enum Msg {
    Append(Pending),
    /// Commit what is queued, then stop (handles may still exist; their later sends fail).
    Stop,
}

/// Handle to the writer thread; [`Committer::close`] flushes what is queued and stops it.
pub struct Committer {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

/// Cloneable handle for request handlers.
#[derive(Clone)]
pub struct CommitHandle {
    tx: mpsc::Sender<Msg>,
}

impl Committer {
    /// Starts the writer thread over an open, replayed log and the keys replay found; batches
    /// that would take `store` past `max_users` users are refused.
    pub fn start(
        log: EventLog,
        store: Arc<HistoryStore>,
        metrics: Arc<Metrics>,
        dedup: DedupWindow,
        compaction: Option<AutoCompaction>,
        max_users: usize,
    ) -> Committer {
        let (tx, rx) = mpsc::channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("event-log".into())
            .spawn(move || writer(log, rx, store, metrics, dedup, compaction, max_users))
            .expect("spawning the event-log thread");
        Committer {
            tx,
            thread: Some(thread),
        }
    }

    pub fn handle(&self) -> CommitHandle {
        CommitHandle {
            tx: self.tx.clone(),
        }
    }

    /// Commits (fsyncs) everything queued and stops the writer. Blocks until it has.
    pub fn close(self) {
        drop(self)
    }
}

/// A committer dropped without `close` (a start-up that failed after the log was opened) still
/// stops its writer before returning, so the log's lock is free for the next server at once.
impl Drop for Committer {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl CommitHandle {
    /// Makes `events` durable and visible, unless `key` was already recorded; says how many
    /// were recorded (by the first attempt, for a repeat).
    pub async fn record(
        &self,
        events: Vec<Event>,
        key: Option<String>,
    ) -> Result<Recorded, RecordError> {
        let (ack, done) = oneshot::channel();
        let pending = Pending {
            record: encode_record(&events, key.as_deref()),
            digest: key.as_ref().map_or(0, |_| batch_digest(&events)),
            events,
            key,
            ack,
        };
        self.tx
            .send(Msg::Append(pending))
            .map_err(|_| "the event log is closed (shutting down)".to_string())?;
        done.await
            .map_err(|_| "the event log writer stopped".to_string())?
    }
}

/// A background compaction in progress.
struct Running {
    thread: JoinHandle<crate::error::Result<Compacted>>,
}

fn writer(
    mut log: EventLog,
    rx: mpsc::Receiver<Msg>,
    store: Arc<HistoryStore>,
    metrics: Arc<Metrics>,
    mut dedup: DedupWindow,
    compaction: Option<AutoCompaction>,
    max_users: usize,
) {
    let mut buf = Vec::new();
    let mut stopping = false;
    let mut running: Option<Running> = None;
    let mut compacted_len = log.len();
    while !stopping {
        let mut batch = Vec::new();
        match rx.recv_timeout(IDLE_POLL) {
            Ok(Msg::Append(p)) => batch.push(p),
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => stopping = true,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let mut bytes = batch.first().map_or(0, |p| p.record.len());
        while bytes < MAX_COMMIT_BYTES {
            match rx.try_recv() {
                Ok(Msg::Append(p)) => {
                    bytes += p.record.len();
                    batch.push(p);
                }
                Ok(Msg::Stop) => stopping = true,
                Err(_) => break,
            }
        }
        let (fresh, repeats) = split_repeats(batch, &dedup);
        let (fresh, repeats) = refuse_past_user_limit(fresh, repeats, &store, max_users);
        if !fresh.is_empty() {
            commit(
                &mut log, fresh, repeats, &mut buf, &store, &metrics, &mut dedup,
            );
        }
        // Swap in a finished compaction; start one when the log has grown enough.
        if running.as_ref().is_some_and(|r| r.thread.is_finished()) {
            let done = running.take().expect("checked").thread.join();
            match done {
                Ok(Ok(c)) => match c.swap_into(&mut log) {
                    Ok(()) => {
                        compacted_len = log.len();
                        metrics.compactions.with_label_values(&["ok"]).inc();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event log compaction could not be swapped in; the log stays as it was");
                        metrics.compactions.with_label_values(&["failed"]).inc();
                    }
                },
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "event log compaction failed; the log stays as it was");
                    metrics.compactions.with_label_values(&["failed"]).inc();
                }
                Err(_) => metrics.compactions.with_label_values(&["failed"]).inc(),
            }
        }
        if let Some(auto) = compaction {
            let len = log.len();
            if running.is_none() && !stopping && len > auto.threshold && len > 2 * compacted_len {
                let path = log.path().to_path_buf();
                let settings = auto.settings;
                let thread = std::thread::Builder::new()
                    .name("event-log-compaction".into())
                    .spawn(move || compact::compact(&path, len, &settings));
                match thread {
                    Ok(thread) => running = Some(Running { thread }),
                    Err(e) => tracing::warn!(error = %e, "cannot start the compaction thread"),
                }
            }
        }
    }
    if let Some(r) = running {
        // Stopping: the log stays as it is; the unfinished compaction is discarded.
        if let Ok(Ok(c)) = r.thread.join() {
            let _ = std::fs::remove_file(&c.staged);
        }
    }
    tracing::debug!(path = %log.path().display(), "event log closed");
}

/// Writes one group with one fsync, applies it and acknowledges every request in it.
fn commit(
    log: &mut EventLog,
    fresh: Vec<Pending>,
    repeats: Vec<(usize, Pending)>,
    buf: &mut Vec<u8>,
    store: &HistoryStore,
    metrics: &Metrics,
    dedup: &mut DedupWindow,
) {
    buf.clear();
    for p in &fresh {
        buf.extend_from_slice(&p.record);
    }
    match log.append(buf) {
        Ok(()) => {
            let n: usize = fresh.iter().map(|p| p.events.len()).sum();
            metrics.events_recorded.inc_by(n as u64);
            metrics.commit_batch.observe(n as f64);
            let counts: Vec<u64> = fresh.iter().map(|p| p.events.len() as u64).collect();
            for p in fresh {
                for e in &p.events {
                    store.record(e.user_id, StoredEvent::from_event(e));
                }
                if let Some(k) = &p.key {
                    dedup.insert(k, p.events.len() as u64, Some(p.digest));
                }
                let _ = p.ack.send(Ok(Recorded {
                    events: p.events.len() as u64,
                    duplicate: false,
                }));
            }
            metrics.set_store_size(store);
            for (first, p) in repeats {
                let _ = p.ack.send(Ok(Recorded {
                    events: counts[first],
                    duplicate: true,
                }));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "event log append failed; the batch is not recorded");
            for p in fresh.into_iter().chain(repeats.into_iter().map(|(_, p)| p)) {
                let _ = p
                    .ack
                    .send(Err(RecordError::Unavailable(format!("event log: {e}"))));
            }
        }
    }
}

/// Splits a group into the batches to write and the repeats of a key earlier in the group (with
/// the index of that first batch). Repeats of a key already committed are answered here.
fn split_repeats(
    batch: Vec<Pending>,
    dedup: &DedupWindow,
) -> (Vec<Pending>, Vec<(usize, Pending)>) {
    let mut fresh: Vec<Pending> = Vec::with_capacity(batch.len());
    let mut repeats = Vec::new();
    let mut first_of: HashMap<String, usize> = HashMap::new();
    for p in batch {
        let Some(key) = p.key.clone() else {
            fresh.push(p);
            continue;
        };
        let reused = |p: Pending, key: String| {
            let _ = p.ack.send(Err(RecordError::KeyReused(key)));
        };
        match dedup.check(&key, p.digest) {
            KeySeen::Repeat(events) => {
                let _ = p.ack.send(Ok(Recorded {
                    events,
                    duplicate: true,
                }));
            }
            KeySeen::Reused => reused(p, key),
            KeySeen::New => match first_of.get(&key) {
                Some(&first) if fresh[first].digest != p.digest => reused(p, key),
                Some(&first) => repeats.push((first, p)),
                None => {
                    first_of.insert(key, fresh.len());
                    fresh.push(p);
                }
            },
        }
    }
    (fresh, repeats)
}

/// Refuses the batches of a group that would take the store past `max_users`, each counted
/// after the new users of the batches before it; a repeat of a refused batch gets its refusal.
fn refuse_past_user_limit(
    fresh: Vec<Pending>,
    repeats: Vec<(usize, Pending)>,
    store: &HistoryStore,
    max_users: usize,
) -> (Vec<Pending>, Vec<(usize, Pending)>) {
    let mut limit = UserLimit::new(store, max_users);
    if limit.has_room_for(fresh.iter().map(|p| p.events.len()).sum()) {
        return (fresh, repeats);
    }
    let refuse = |p: Pending, reason: &str| {
        let _ = p.ack.send(Err(RecordError::UserLimit(reason.to_string())));
    };
    let mut kept = Vec::with_capacity(fresh.len());
    // Where each batch went: its place in `kept`, or why it was refused.
    let mut outcome: Vec<Result<usize, String>> = Vec::with_capacity(fresh.len());
    for p in fresh {
        match limit.admit(&p.events) {
            Ok(()) => {
                outcome.push(Ok(kept.len()));
                kept.push(p);
            }
            Err(reason) => {
                refuse(p, &reason);
                outcome.push(Err(reason));
            }
        }
    }
    let repeats = repeats
        .into_iter()
        .filter_map(|(first, p)| match &outcome[first] {
            Ok(i) => Some((*i, p)),
            Err(reason) => {
                refuse(p, reason);
                None
            }
        })
        .collect();
    (kept, repeats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventlog::EventLog;
    use crate::logrecord::Record;
    use features::splits::{HistoryProtocol, TieOrder};

    #[test]
    fn a_dropped_committer_releases_the_event_log_lock_before_returning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        for _ in 0..20 {
            let (log, _) = EventLog::open(&path, &mut |_: Record| {}).unwrap();
            let committer = Committer::start(
                log,
                Arc::new(HistoryStore::new(
                    8,
                    TieOrder::ItemId,
                    HistoryProtocol::Strict,
                )),
                Arc::new(Metrics::new()),
                DedupWindow::new(16),
                None,
                usize::MAX,
            );
            let _handle = committer.handle();
            drop(committer);
            // The next server opens (and locks) the same log straight away.
            EventLog::open(&path, &mut |_: Record| {}).unwrap();
        }
    }

    fn purchase(user_id: u64, item: u64) -> Event {
        Event {
            user_id,
            ts_ms: 1_000,
            event_type: features::EventType::Purchase,
            item_id: Some(item),
            query: None,
            value: None,
        }
    }

    #[test]
    fn a_repeat_of_a_batch_refused_at_max_users_gets_its_refusal_and_the_rest_keep_their_places() {
        let store = HistoryStore::new(8, TieOrder::ItemId, HistoryProtocol::Strict);
        store.record(1, StoredEvent::from_event(&purchase(1, 10)));
        let pending = |events: Vec<Event>| {
            let (ack, done) = oneshot::channel();
            let p = Pending {
                record: Vec::new(),
                events,
                key: None,
                digest: 0,
                ack,
            };
            (p, done)
        };
        // Room for two users: the held one and one more. A adds two, B one, C none.
        let (a, mut a_done) = pending(vec![purchase(2, 10), purchase(3, 10)]);
        let (b, _b_done) = pending(vec![purchase(4, 10)]);
        let (c, _c_done) = pending(vec![purchase(1, 11)]);
        let (a_again, mut a_again_done) = pending(vec![purchase(2, 10), purchase(3, 10)]);
        let (c_again, _c_again_done) = pending(vec![purchase(1, 11)]);
        let (kept, repeats) =
            refuse_past_user_limit(vec![a, b, c], vec![(0, a_again), (2, c_again)], &store, 2);
        let kept_users: Vec<u64> = kept.iter().map(|p| p.events[0].user_id).collect();
        assert_eq!(kept_users, vec![4, 1]);
        assert_eq!(repeats.len(), 1);
        assert_eq!(repeats[0].0, 1, "C's repeat points at C's new place");
        for done in [&mut a_done, &mut a_again_done] {
            match done.try_recv() {
                Ok(Err(RecordError::UserLimit(reason))) => {
                    assert!(reason.contains("max_users = 2"), "{reason}")
                }
                other => panic!("expected a max_users refusal, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_key_reused_for_other_events_is_refused_not_dropped_as_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let start = |dedup| {
            let (log, _) = EventLog::open(&path, &mut |_: Record| {}).unwrap();
            let store = Arc::new(HistoryStore::new(
                8,
                TieOrder::ItemId,
                HistoryProtocol::Strict,
            ));
            Committer::start(
                log,
                store,
                Arc::new(Metrics::new()),
                dedup,
                None,
                usize::MAX,
            )
        };
        let committer = start(DedupWindow::new(16));
        let h = committer.handle();
        let key = || Some("k".to_string());
        let first = h.record(vec![purchase(1, 10)], key()).await.unwrap();
        assert!(!first.duplicate);
        // The retry of the same batch is a duplicate; another batch under the key is refused.
        assert!(
            h.record(vec![purchase(1, 10)], key())
                .await
                .unwrap()
                .duplicate
        );
        let other = vec![purchase(2, 11), purchase(2, 12), purchase(2, 13)];
        let err = h.record(other.clone(), key()).await.unwrap_err();
        assert_eq!(err, RecordError::KeyReused("k".into()));
        assert!(err.to_string().starts_with("idempotency_key: `k`"), "{err}");
        drop(h);
        committer.close();
        // After a restart the window, rebuilt from the log, still tells them apart.
        let mut dedup = DedupWindow::new(16);
        let store = HistoryStore::new(8, TieOrder::ItemId, HistoryProtocol::Strict);
        EventLog::open(&path, &mut |r: Record| {
            crate::seed::apply_record(&store, None, &mut dedup, r)
        })
        .unwrap();
        assert_eq!(
            dedup.check("k", crate::dedup::batch_digest(&other)),
            KeySeen::Reused
        );
    }
}
