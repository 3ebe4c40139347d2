//! The event bus: `RecordEvents` through a NATS JetStream stream that every replica consumes, so
//! replicas behind one load balancer share each user's fresh history.
//!
//! A request is published to the stream (one message per batch, in the event log's record
//! format) and answered only after JetStream acknowledged it and this replica applied it, so
//! the next `Recommend` on the same replica already sees it. Every replica, the publishing one
//! included, applies the stream in stream order through one ordered consumer; so all replicas
//! hold the same histories, a few milliseconds apart.
//!
//! Retries do not double events. Each message carries a `Nats-Msg-Id`: the request's
//! idempotency key, or, without one, a digest of the batch's contents; JetStream drops a repeat
//! within the stream's duplicate window. Keys are also kept in the same count-bounded window as
//! the event log's ([`DedupWindow`]), rebuilt from the stream at start-up, so a keyed retry after
//! the duplicate window is still answered as a repeat.
//!
//! Start-up replays the whole stream before serving. The stream's retention (its limits, set
//! when it is created; see `docs/operations.md`) is therefore what bounds a replica's start-up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use features::Event;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::commit::{RecordError, Recorded};
use crate::dedup::{batch_digest, DedupWindow, KeySeen};
use crate::error::{Error, Result};
use crate::history::HistoryStore;
use crate::logrecord::{self, Record};
use crate::metrics::Metrics;
use crate::seed::{self, Counts};

/// The NATS header JetStream deduplicates on.
const MSG_ID: &str = "Nats-Msg-Id";

/// Where the bus is and how the stream is set up.
#[derive(Debug, Clone, PartialEq)]
pub struct BusSettings {
    /// NATS server URL, e.g. `nats://nats:4222`.
    pub url: String,
    /// JetStream stream name (created if missing, with `subject` as its only subject).
    pub stream: String,
    /// Subject events are published on.
    pub subject: String,
    /// How long start-up keeps trying to reach the server before it fails.
    pub connect_timeout: Duration,
    /// JetStream's deduplication window for message ids (used when the stream is created).
    pub duplicate_window: Duration,
    /// Oldest message the stream keeps (0: no age limit). Bounds replay at start-up.
    pub max_age: Duration,
}

impl BusSettings {
    /// Settings for `stream` on the server at `url`, with default timeouts; the subject is
    /// derived from the stream's name (`TWOTOWER_EVENTS` → `twotower_events.batches`).
    pub fn new(url: impl Into<String>, stream: &str) -> BusSettings {
        BusSettings {
            url: url.into(),
            stream: stream.to_string(),
            subject: format!("{}.batches", stream.to_ascii_lowercase()),
            connect_timeout: Duration::from_secs(30),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
        }
    }
}

/// The handle requests record through.
#[derive(Clone)]
pub struct BusHandle {
    js: jetstream::Context,
    subject: String,
    applied: watch::Receiver<u64>,
    dedup: Arc<Mutex<DedupWindow>>,
    metrics: Arc<Metrics>,
}

/// A connected bus whose stream was replayed into the store, and the task that keeps applying.
pub struct Bus {
    pub handle: BusHandle,
    /// Events applied while replaying, before serving.
    pub replayed_events: u64,
    pub consumer: tokio::task::JoinHandle<()>,
}

fn bus_err(settings: &BusSettings, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Transport(format!(
        "event bus {} (stream {}): {what}: {e}",
        settings.url, settings.stream
    ))
}

/// Connects, creates the stream if missing, replays it into `store` (and `counts`, `dedup`),
/// then keeps applying it in a background task until `down` turns true.
pub async fn start(
    settings: &BusSettings,
    store: Arc<HistoryStore>,
    counts: &mut Counts,
    dedup: DedupWindow,
    metrics: Arc<Metrics>,
    down: watch::Receiver<bool>,
) -> Result<Bus> {
    let client = connect(settings).await?;
    let js = jetstream::new(client);
    let mut config = stream::Config {
        name: settings.stream.clone(),
        subjects: vec![settings.subject.clone()],
        storage: stream::StorageType::File,
        duplicate_window: settings.duplicate_window,
        ..Default::default()
    };
    if !settings.max_age.is_zero() {
        config.max_age = settings.max_age;
    }
    let mut events = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| bus_err(settings, "creating the stream", e))?;
    let state = events
        .info()
        .await
        .map_err(|e| bus_err(settings, "reading the stream's state", e))?
        .state
        .clone();
    // A purged or expired stream keeps its last sequence but holds nothing to replay.
    let last = if state.messages == 0 {
        0
    } else {
        state.last_sequence
    };

    let dedup = Arc::new(Mutex::new(dedup));
    let mut applier = Applier {
        store,
        dedup: dedup.clone(),
        metrics: metrics.clone(),
        applied: 0,
        events: 0,
    };
    let mut messages = subscribe(&events, settings, 1).await?;
    // Replay: everything up to the last message at start-up, counting item popularity too.
    while applier.applied < last {
        let msg = tokio::time::timeout(settings.connect_timeout, messages.next())
            .await
            .map_err(|_| {
                bus_err(
                    settings,
                    "replaying",
                    format!(
                        "no message for {:?} at sequence {} of {last}",
                        settings.connect_timeout,
                        applier.applied + 1
                    ),
                )
            })?;
        match msg {
            Some(Ok(m)) => applier.apply(&m, Some(counts)),
            Some(Err(e)) => tracing::warn!(error = %e, "event bus: replay hiccup; retrying"),
            None => messages = subscribe(&events, settings, applier.applied + 1).await?,
        }
    }
    let replayed_events = applier.events;
    tracing::info!(
        stream = %settings.stream,
        messages = last,
        events = replayed_events,
        "event bus replayed"
    );
    let (applied_tx, applied_rx) = watch::channel(applier.applied);
    let settings_bg = settings.clone();
    let consumer = tokio::spawn(async move {
        follow(
            &mut events,
            &settings_bg,
            applier,
            messages,
            applied_tx,
            down,
        )
        .await
    });
    Ok(Bus {
        handle: BusHandle {
            js,
            subject: settings.subject.clone(),
            applied: applied_rx,
            dedup,
            metrics,
        },
        replayed_events,
        consumer,
    })
}

async fn connect(settings: &BusSettings) -> Result<async_nats::Client> {
    let deadline = tokio::time::Instant::now() + settings.connect_timeout;
    loop {
        let attempt = async_nats::ConnectOptions::new()
            .name("twotower-server")
            .connection_timeout(Duration::from_secs(2))
            .connect(settings.url.as_str())
            .await;
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(bus_err(
                    settings,
                    &format!("cannot connect within {:?}", settings.connect_timeout),
                    e,
                ))
            }
            Err(e) => {
                tracing::warn!(url = %settings.url, error = %e, "event bus not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

type Messages = consumer::pull::Ordered;

/// An ordered consumer from stream sequence `from` on (ordered consumers recreate themselves
/// on a gap or a reconnect, so the order and completeness hold across NATS restarts).
async fn subscribe(events: &stream::Stream, settings: &BusSettings, from: u64) -> Result<Messages> {
    let deliver_policy = if from <= 1 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        }
    };
    events
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: settings.subject.clone(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| bus_err(settings, "creating a consumer", e))?
        .messages()
        .await
        .map_err(|e| bus_err(settings, "consuming", e))
}

/// Applies messages in stream order.
struct Applier {
    store: Arc<HistoryStore>,
    dedup: Arc<Mutex<DedupWindow>>,
    metrics: Arc<Metrics>,
    /// Stream sequence of the last message applied.
    applied: u64,
    /// Events applied.
    events: u64,
}

impl Applier {
    /// Applies one message; `counts` (item popularity) only while replaying, as the event log
    /// does: popularity is fixed once serving starts.
    fn apply(&mut self, msg: &jetstream::Message, counts: Option<&mut Counts>) {
        let seq = match msg.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => {
                tracing::warn!(error = %e, "event bus: a message without JetStream metadata; skipped");
                return;
            }
        };
        if seq <= self.applied {
            return; // redelivered after a consumer was recreated
        }
        self.applied = seq;
        let record = logrecord::record_at(&msg.payload, 0).map(|(r, _)| r);
        let Some(record) = record else {
            tracing::warn!(
                sequence = seq,
                bytes = msg.payload.len(),
                "event bus: a message that is not an event batch; skipped"
            );
            self.metrics.bus_malformed.inc();
            return;
        };
        if let Record::Batch { events, .. } = &record {
            self.events += events.len() as u64;
            self.metrics.bus_events_applied.inc_by(events.len() as u64);
        }
        let mut dedup = self.dedup.lock().expect("dedup lock");
        seed::apply_record(&self.store, counts, &mut dedup, record);
        self.metrics.set_store_size(&self.store);
    }
}

/// Keeps applying the stream until `down`; resubscribes from the next sequence when the
/// message stream ends or fails.
async fn follow(
    events: &mut stream::Stream,
    settings: &BusSettings,
    mut applier: Applier,
    mut messages: Messages,
    applied: watch::Sender<u64>,
    mut down: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            _ = down.wait_for(|d| *d) => return,
        };
        match next {
            Some(Ok(m)) => {
                applier.apply(&m, None);
                applied.send_replace(applier.applied);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "event bus: consumer error; it recovers by itself");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None => loop {
                match subscribe(events, settings, applier.applied + 1).await {
                    Ok(m) => {
                        messages = m;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event bus: resubscribing");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = down.wait_for(|d| *d) => return,
                        }
                    }
                }
            },
        }
    }
}

/// A message id for a batch without an idempotency key: a digest of its contents, the same on
/// every replica and in every version, so a retry of the same events is recognised.
pub fn derived_id(record: &[u8]) -> String {
    let digest = Sha256::digest(record);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// How long a request waits for its own message to come back from the stream.
const VISIBLE_WAIT: Duration = Duration::from_secs(5);

impl BusHandle {
    /// Publishes `events`, waits for JetStream's acknowledgement, then for this replica to have
    /// applied it (so its next `Recommend` sees it). A repeat of a known key is answered at once.
    pub async fn record(
        &self,
        events: Vec<Event>,
        key: Option<String>,
    ) -> std::result::Result<Recorded, RecordError> {
        let digest = batch_digest(&events);
        if let Some(k) = &key {
            match self.dedup.lock().expect("dedup lock").check(k, digest) {
                KeySeen::New => {}
                KeySeen::Repeat(n) => {
                    return Ok(Recorded {
                        events: n,
                        duplicate: true,
                    })
                }
                KeySeen::Reused => return Err(RecordError::KeyReused(k.clone())),
            }
        }
        let record = logrecord::encode_batch(&events, key.as_deref());
        let id = key.clone().unwrap_or_else(|| derived_id(&record));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID, id.as_str());
        let ack = self
            .js
            .publish_with_headers(self.subject.clone(), headers, record.into())
            .await
            .map_err(|e| format!("event bus: publishing: {e}"))?
            .await
            .map_err(|e| format!("event bus: no acknowledgement: {e}"))?;
        let mut applied = self.applied.clone();
        let seen = tokio::time::timeout(VISIBLE_WAIT, applied.wait_for(|&s| s >= ack.sequence));
        if !matches!(seen.await, Ok(Ok(_))) {
            tracing::warn!(
                sequence = ack.sequence,
                "event bus: recorded, but not yet applied here after {VISIBLE_WAIT:?}"
            );
        }
        let n = events.len() as u64;
        if ack.duplicate {
            // Another replica (or a concurrent request) recorded this key first: a repeat only
            // if it was the same batch, which the window, now applied, tells.
            let seen = key
                .as_deref()
                .map(|k| self.dedup.lock().expect("dedup lock").check(k, digest));
            let events = match (seen, key) {
                (Some(KeySeen::Reused), Some(k)) => return Err(RecordError::KeyReused(k)),
                (Some(KeySeen::Repeat(first)), _) => first,
                _ => n,
            };
            return Ok(Recorded {
                events,
                duplicate: true,
            });
        }
        self.metrics.events_recorded.inc_by(n);
        Ok(Recorded {
            events: n,
            duplicate: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_follow_the_contents() {
        let e = |item| Event {
            user_id: 7,
            ts_ms: 1_700_000_000_000,
            event_type: features::EventType::View,
            item_id: Some(item),
            query: None,
            value: None,
        };
        let a = derived_id(&logrecord::encode_batch(&[e(1)], None));
        assert_eq!(a, derived_id(&logrecord::encode_batch(&[e(1)], None)));
        assert_ne!(a, derived_id(&logrecord::encode_batch(&[e(2)], None)));
        assert!(a.starts_with("sha256:") && a.len() == 39, "{a}");
    }
}
