//! Group commit: one writer thread makes `RecordEvents` batches durable together.
//!
//! Requests hand their events to the writer and wait. The writer takes every batch that is
//! waiting, appends them to the event log in one write, fsyncs once, applies them to the history
//! store, and only then acknowledges each request. One fsync thus covers many concurrent
//! requests (the fsync, not the write, is what costs), and an acknowledged event is both durable
//! and visible to the next `Recommend`.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use features::Event;
use tokio::sync::oneshot;

use crate::eventlog::{encode_record, EventLog};
use crate::history::{HistoryStore, StoredEvent};
use crate::metrics::Metrics;

/// Most bytes written per fsync; a backlog larger than this is committed in several rounds.
const MAX_COMMIT_BYTES: usize = 8 << 20;

struct Pending {
    record: Vec<u8>,
    events: Vec<Event>,
    ack: oneshot::Sender<Result<u64, String>>,
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
    /// Starts the writer thread over an open, replayed log.
    pub fn start(log: EventLog, store: Arc<HistoryStore>, metrics: Arc<Metrics>) -> Committer {
        let (tx, rx) = mpsc::channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("event-log".into())
            .spawn(move || writer(log, rx, store, metrics))
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
    /// Makes `events` durable and visible; returns how many were recorded.
    pub async fn record(&self, events: Vec<Event>) -> Result<u64, String> {
        let (ack, done) = oneshot::channel();
        let pending = Pending {
            record: encode_record(&events),
            events,
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
        if batch.is_empty() {
            continue;
        }
        buf.clear();
        for p in &batch {
            buf.extend_from_slice(&p.record);
        }
        match log.append(&buf) {
            Ok(()) => {
                let n: usize = batch.iter().map(|p| p.events.len()).sum();
                metrics.events_recorded.inc_by(n as u64);
                metrics.commit_batch.observe(n as f64);
                for p in batch {
                    for e in &p.events {
                        store.record(e.user_id, StoredEvent::from_event(e));
                    }
                    let _ = p.ack.send(Ok(p.events.len() as u64));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "event log append failed; the batch is not recorded");
                for p in batch {
                    let _ = p.ack.send(Err(format!("event log: {e}")));
                }
            }
        }
    }
    tracing::debug!(path = %log.path().display(), "event log closed");
}
