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
//! repeat of a key earlier in the same group gets that batch's outcome.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use features::Event;
use tokio::sync::oneshot;

use crate::dedup::DedupWindow;
use crate::eventlog::{encode_record, EventLog};
use crate::history::{HistoryStore, StoredEvent};
use crate::metrics::Metrics;

/// Most bytes written per fsync; a backlog larger than this is committed in several rounds.
const MAX_COMMIT_BYTES: usize = 8 << 20;

/// What a committed batch reports: events recorded, and whether it repeated a recorded key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub events: u64,
    pub duplicate: bool,
}

struct Pending {
    record: Vec<u8>,
    events: Vec<Event>,
    key: Option<String>,
    ack: oneshot::Sender<Result<Recorded, String>>,
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
    /// Starts the writer thread over an open, replayed log and the keys replay found.
    pub fn start(
        log: EventLog,
        store: Arc<HistoryStore>,
        metrics: Arc<Metrics>,
        dedup: DedupWindow,
    ) -> Committer {
        let (tx, rx) = mpsc::channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("event-log".into())
            .spawn(move || writer(log, rx, store, metrics, dedup))
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
    pub fn close(mut self) {
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
    ) -> Result<Recorded, String> {
        let (ack, done) = oneshot::channel();
        let pending = Pending {
            record: encode_record(&events, key.as_deref()),
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

fn writer(
    mut log: EventLog,
    rx: mpsc::Receiver<Msg>,
    store: Arc<HistoryStore>,
    metrics: Arc<Metrics>,
    mut dedup: DedupWindow,
) {
    let mut buf = Vec::new();
    let mut stopping = false;
    while !stopping {
        let mut batch = Vec::new();
        match rx.recv() {
            Ok(Msg::Append(p)) => batch.push(p),
            Ok(Msg::Stop) | Err(_) => stopping = true,
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
        if fresh.is_empty() {
            continue;
        }
        buf.clear();
        for p in &fresh {
            buf.extend_from_slice(&p.record);
        }
        match log.append(&buf) {
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
                        dedup.insert(k, p.events.len() as u64);
                    }
                    let _ = p.ack.send(Ok(Recorded {
                        events: p.events.len() as u64,
                        duplicate: false,
                    }));
                }
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
                    let _ = p.ack.send(Err(format!("event log: {e}")));
                }
            }
        }
    }
    tracing::debug!(path = %log.path().display(), "event log closed");
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
        if let Some(events) = dedup.get(&key) {
            let _ = p.ack.send(Ok(Recorded {
                events,
                duplicate: true,
            }));
        } else if let Some(&first) = first_of.get(&key) {
            repeats.push((first, p));
        } else {
            first_of.insert(key, fresh.len());
            fresh.push(p);
        }
    }
    (fresh, repeats)
}
