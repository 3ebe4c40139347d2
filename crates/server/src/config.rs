//! Tunable serving settings: built-in defaults, then `--config FILE` (TOML, these fields at the
//! top level). Paths and addresses are flags of `twotower serve`, not settings.

use std::path::Path;

use serde::Deserialize;

use crate::admission::Target;
use crate::error::{Error, Result};

/// Most items one `Recommend` or `SimilarItems` may ask for.
pub const MAX_K: u32 = 1000;
/// Most inline events one `Recommend` may carry.
pub const MAX_INLINE_EVENTS: usize = 512;

/// Serving settings. Every field has a default, so an empty file is a valid configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// How often the reload watcher looks at `INDEX_ROOT/CURRENT` and `MODEL_DIR/model.json`.
    pub reload_interval_ms: u64,
    /// Largest accepted request message, in bytes (larger ones get `OUT_OF_RANGE`).
    pub max_message_bytes: usize,
    /// Deadline of a request whose client sets none; a client's `grpc-timeout` may only shorten it.
    pub request_timeout_ms: u64,
    /// Threads that run the user tower and then the index search of each request, each with its
    /// own copy of the model. They sit outside the async runtime so a forward pass never stalls
    /// network I/O. Default: one per CPU core, at most 8.
    /// Fewer workers form bigger micro-batches, but since the search runs on them too, one
    /// worker leaves a second core idle: on 2 cores, 2 workers served 4,854 Recommend/s against
    /// 3,384 with 1, with a p99 at 2,000/s of 6.9 against 22.4 ms (docs/benchmarks.md, serving
    /// under overload). On an earlier machine, before the search moved onto the workers, 1 had
    /// beaten 2.
    pub encoder_workers: usize,
    /// Most requests one user-tower forward pass batches together (micro-batching: concurrent
    /// requests waiting for a worker are encoded in one call).
    pub max_encoder_batch: usize,
    /// libtorch intra-op threads (process-wide). 1 suits many small concurrent forward passes.
    pub torch_threads: usize,
    /// Most events one `RecordEvents` request may carry.
    pub max_record_events: usize,
    /// Candidates fetched from FAISS beyond which filtering switches to an exact scan of every
    /// embedding (exact, and cheaper than ever larger approximate searches).
    pub max_overfetch: usize,
    /// How long shutdown waits for in-flight requests before closing the event log anyway.
    pub shutdown_grace_ms: u64,
    /// How far ahead of the server's clock a recorded event's time may be. Later events are
    /// refused (`INVALID_ARGUMENT` naming `ts_ms`): one far-future event would otherwise pin
    /// that user's "now" for good.
    pub max_clock_skew_ms: u64,
    /// How many keyed `RecordEvents` batches are remembered for deduplication (the last N, kept
    /// across restarts through the event log). 0 turns deduplication off.
    pub idempotency_window: usize,
    /// Most requests handled at once; more get `RESOURCE_EXHAUSTED` at once instead of queueing.
    /// This bounds the user-tower and event-log queues, and so the latency of admitted requests
    /// under overload (docs/benchmarks.md).
    pub max_in_flight: usize,
    /// While even the quickest request of a 50 ms interval in which requests were refused
    /// spends longer than this in the server (a queue that no longer drains), fewer than
    /// `max_in_flight` are taken at once, and while the median request does, no more are; so
    /// admitted requests typically wait about this long under overload; bursts that drain keep
    /// the whole `max_in_flight` (`admission.rs`). `"auto"` (the default): twice what a request
    /// takes when it finds the server empty, measured as the server runs, since what a request
    /// costs depends on the model, the index and the machine. A number of ms sets it by hand
    /// (above what one request takes on an idle server, or every interval looks like a
    /// standing queue). 0: a fixed limit of `max_in_flight`, which under overload queues that
    /// many requests (15x normal p99 at 3x capacity on 2 cores, docs/benchmarks.md).
    #[serde(deserialize_with = "admission_target")]
    pub admission_target_ms: Target,
    /// Most concurrent HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive pings every this many ms on idle connections (dead peers are dropped
    /// after a further 20 s without an answer).
    pub keepalive_interval_ms: u64,
    /// Most client connections open at once; one more is closed as it is accepted (and counted
    /// in `twotower_connections_refused_total`). Lowered at start-up to what the open-file limit
    /// leaves after 256 descriptors for the server's own files (`connections.rs`).
    pub max_connections: usize,
    /// A connection that sends no byte (no HTTP/2 preface, no TLS hello) within this many ms is
    /// closed: it would hold a descriptor for nothing.
    pub handshake_timeout_ms: u64,
    /// Most users the history store holds. `RecordEvents` for a user beyond it is refused with
    /// `RESOURCE_EXHAUSTED` naming this setting (users already held keep recording), so a
    /// client inventing user ids cannot grow memory without limit. About 1 KB a user.
    pub max_users: usize,
    /// The event log is compacted (rewritten as the state it holds: each user's recent events,
    /// seen items, counts, the idempotency window) when it grows past this many bytes and has
    /// doubled since the last compaction; at start-up and in the background. 0: never.
    pub compact_log_bytes: u64,
    /// Events kept per user beyond the model's history length. A request at a past time (a
    /// replay, an evaluation through the server) needs the L events before that time, and the
    /// events since would otherwise have pushed some of them out: with a slack of S the window
    /// is exact for times with up to S newer events. Requests at "now" need none, and a slack
    /// of 16 cost about 10% of closed-loop throughput on the 1M-item benchmark, so the default
    /// is 0 (docs/benchmarks.md).
    pub history_slack: usize,
    /// How far below the user-tower workers the async runtime's threads (request I/O, decoding,
    /// refusals) run: added to the process's nice value for them alone, as `nice -n`
    /// does, 0–19. Under overload those threads spend a core on taking in and refusing the
    /// excess, and at equal priority the workers computing the admitted requests got what was
    /// left: 642–681 admitted Recommend/s under a 3x overload on one core, against
    /// 1,290–1,637/s at 5 (docs/benchmarks.md, session 20). Work already admitted goes first.
    /// Lower them too far and they cannot take requests in and answer them: at 5 and above,
    /// admitted p99 under that overload ran to 7.7–32 ms (10 at 166 ms, 19 at seconds), at 3 it
    /// held at 3.5–5.1 ms in seven runs (session 22), which is the default.
    /// `SimilarItems` searches run on the user-tower workers too, at their priority. 0: the
    /// workers' priority.
    pub grpc_thread_nice: i32,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            reload_interval_ms: 1000,
            max_message_bytes: 4 << 20,
            request_timeout_ms: 10_000,
            encoder_workers: default_encoder_workers(),
            max_encoder_batch: 64,
            torch_threads: 1,
            max_record_events: 10_000,
            max_overfetch: 8192,
            shutdown_grace_ms: 10_000,
            max_clock_skew_ms: 3_600_000,
            idempotency_window: 100_000,
            max_in_flight: 64,
            admission_target_ms: Target::Auto,
            max_concurrent_streams: 256,
            keepalive_interval_ms: 30_000,
            max_connections: 10_000,
            handshake_timeout_ms: 10_000,
            max_users: 10_000_000,
            compact_log_bytes: 64 << 20,
            history_slack: 0,
            grpc_thread_nice: 3,
        }
    }
}

/// `admission_target_ms`: a number of milliseconds (0: off) or `"auto"`.
fn admission_target<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Target, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Millis(u64),
        Word(String),
    }
    match Raw::deserialize(d)? {
        Raw::Millis(0) => Ok(Target::Off),
        Raw::Millis(ms) => Ok(Target::Fixed(std::time::Duration::from_millis(ms))),
        Raw::Word(w) if w == "auto" => Ok(Target::Auto),
        Raw::Word(w) => Err(serde::de::Error::custom(format!(
            "admission_target_ms: `{w}` is neither a number of milliseconds nor \"auto\""
        ))),
    }
}

fn default_encoder_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 8))
}

impl ServeConfig {
    /// Reads a TOML file of these settings at the top level. Unknown keys are rejected by name.
    pub fn from_toml_file(path: &Path) -> Result<ServeConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |e: toml::de::Error| Error::BadFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let cfg: ServeConfig = toml::from_str(&text).map_err(bad)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges, naming the first bad setting.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("reload_interval_ms", self.reload_interval_ms as usize),
            ("max_message_bytes", self.max_message_bytes),
            ("request_timeout_ms", self.request_timeout_ms as usize),
            ("encoder_workers", self.encoder_workers),
            ("max_encoder_batch", self.max_encoder_batch),
            ("torch_threads", self.torch_threads),
            ("max_record_events", self.max_record_events),
            ("max_overfetch", self.max_overfetch),
            ("max_in_flight", self.max_in_flight),
            (
                "max_concurrent_streams",
                self.max_concurrent_streams as usize,
            ),
            ("keepalive_interval_ms", self.keepalive_interval_ms as usize),
            ("max_connections", self.max_connections),
            ("handshake_timeout_ms", self.handshake_timeout_ms as usize),
            ("max_users", self.max_users),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::setting(name, "must be at least 1"));
            }
        }
        if self.encoder_workers > 64 {
            return Err(Error::setting("encoder_workers", "at most 64"));
        }
        if !(0..=19).contains(&self.grpc_thread_nice) {
            // A negative nice would raise the threads above the workers, and needs privileges.
            return Err(Error::setting("grpc_thread_nice", "must be within 0..=19"));
        }
        if self.max_message_bytes < 1024 {
            return Err(Error::setting("max_message_bytes", "at least 1024"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ServeConfig::default().validate().unwrap();
    }

    #[test]
    fn top_level_fields_parse_and_unknown_keys_fail() {
        let tmp = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = tmp.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let top = ServeConfig::from_toml_file(&write("a.toml", "encoder_workers = 3\n")).unwrap();
        assert_eq!(top.encoder_workers, 3);
        let err = ServeConfig::from_toml_file(&write("c.toml", "nope = 1\n")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = ServeConfig::from_toml_file(&write("d.toml", "torch_threads = 0\n")).unwrap_err();
        assert!(err.to_string().contains("torch_threads"), "{err}");
    }

    #[test]
    fn admission_target_takes_milliseconds_zero_or_auto() {
        let parse = |text: &str| toml::from_str::<ServeConfig>(text).map(|c| c.admission_target_ms);
        assert_eq!(ServeConfig::default().admission_target_ms, Target::Auto);
        assert_eq!(
            parse("admission_target_ms = \"auto\"").unwrap(),
            Target::Auto
        );
        assert_eq!(parse("admission_target_ms = 0").unwrap(), Target::Off);
        assert_eq!(
            parse("admission_target_ms = 3").unwrap(),
            Target::Fixed(std::time::Duration::from_millis(3))
        );
        let err = parse("admission_target_ms = \"soon\"").unwrap_err();
        assert!(err.to_string().contains("admission_target_ms"), "{err}");
    }
}
