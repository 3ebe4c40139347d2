//! Where `RecordEvents` goes: the embedded event log (the default, one server) or the event bus
//! (NATS JetStream, shared by replicas). Both end in the same history store, through the same
//! record format and idempotency window.

use std::path::PathBuf;

use features::Event;

use crate::bus::{BusHandle, BusSettings};
use crate::commit::{CommitHandle, RecordError, Recorded};

/// Where a server keeps recorded events.
#[derive(Debug, Clone, PartialEq)]
pub enum EventStore {
    /// A local write-ahead log file (created if missing), replayed at start-up.
    Log(PathBuf),
    /// A NATS JetStream stream, replayed at start-up and followed while serving.
    Bus(BusSettings),
}

impl std::fmt::Display for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventStore::Log(p) => write!(f, "event log {}", p.display()),
            EventStore::Bus(b) => write!(f, "event bus {} (stream {})", b.url, b.stream),
        }
    }
}

/// The request handlers' way to record events.
// One per server, held in its shared state: the size of the bus variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Recorder {
    Log(CommitHandle),
    Bus(BusHandle),
}

impl Recorder {
    /// Makes `events` durable and visible to this server's next `Recommend`, unless `key` was
    /// already recorded; says how many were recorded (by the first attempt, for a repeat).
    pub async fn record(
        &self,
        events: Vec<Event>,
        key: Option<String>,
    ) -> Result<Recorded, RecordError> {
        match self {
            Recorder::Log(log) => log.record(events, key).await,
            Recorder::Bus(bus) => bus.record(events, key).await,
        }
    }
}
