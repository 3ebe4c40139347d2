//! Prometheus metrics, rendered as text on `--metrics-addr` at `/metrics`.
//!
//! Each server owns its registry (no process-global state), so tests can run several servers in
//! one process.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::connections::ConnectionGauges;

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by RPC and gRPC status code name (`OK`, `INVALID_ARGUMENT`, ...).
    pub requests: IntCounterVec,
    /// Seconds from a request's arrival to its response, by RPC.
    pub latency: HistogramVec,
    /// Seconds of one user-tower forward pass (one micro-batch).
    pub user_tower: Histogram,
    /// Requests per user-tower forward pass.
    pub encoder_batch: Histogram,
    /// Seconds of FAISS search and exact filtering per request.
    pub faiss: Histogram,
    /// Seconds of one micro-batch's coarse search: its users' IVF lists, found together.
    pub coarse: Histogram,
    /// 1 for the index and model versions being served.
    pub version: IntGaugeVec,
    /// Events made durable by `RecordEvents`.
    pub events_recorded: IntCounter,
    /// Events per fsync of the event log (group commit size).
    pub commit_batch: Histogram,
    /// Reload attempts by result (`ok`, `rejected`).
    pub reloads: IntCounterVec,
    /// Recorded events whose item id is not in the served index (new items, or wrong ids).
    pub events_unknown_item: IntCounter,
    /// Background event-log compactions by result (`ok`, `failed`).
    pub compactions: IntCounterVec,
    /// Bytes of a torn or garbage event-log tail cut off at start-up.
    pub event_log_truncated_bytes: IntCounter,
    /// Polls that found `CURRENT` empty, garbled or unreadable.
    pub current_unreadable: IntCounter,
    /// 1 while the server serves an older index version because the one `CURRENT` named at
    /// start-up was broken (see `--strict`).
    pub fallback_version: IntGauge,
    /// Events replayed at start-up (from the event log or the event bus's stream).
    pub events_replayed: IntGauge,
    /// Events applied from the event bus (this replica's and every other one's).
    pub bus_events_applied: IntCounter,
    /// Event-bus messages that were not event batches (skipped).
    pub bus_malformed: IntCounter,
    /// 1 while the server takes requests: start-up is done and shutdown has not begun. What
    /// `GET /ready` answers, for load balancers that cannot speak gRPC health.
    pub ready: IntGauge,
    /// Requests the server takes at once right now: `max_in_flight`, or less while requests wait
    /// longer than `admission_target_ms` (`admission.rs`).
    pub admission_limit: IntGauge,
    /// The time in the server that counts as a standing queue: `admission_target_ms`, or the
    /// measured one (0 while off or not yet measured).
    pub admission_target: Gauge,
    /// Client connections open now (bounded by `max_connections`).
    pub connections: IntGauge,
    /// Connections closed as they were accepted, past `max_connections`.
    pub connections_refused: IntCounter,
    /// Connections to this metrics endpoint open now (bounded, `connections.rs`).
    pub metrics_connections: IntGauge,
    /// Connections to this metrics endpoint closed as they were accepted, past its bound.
    pub metrics_connections_refused: IntCounter,
    /// Users the history store holds (bounded by `max_users`).
    pub users: IntGauge,
    /// Seen items summed over users: grows with every new (user, item) pair, by design
    /// (`exclude_seen` is exact), about 8 bytes each.
    pub seen_items: IntGauge,
}

fn histogram(name: &str, help: &str, start: f64, count: usize) -> Histogram {
    let opts = HistogramOpts::new(name, help)
        .buckets(exponential_buckets(start, 2.0, count).expect("valid buckets"));
    Histogram::with_opts(opts).expect("valid histogram")
}

impl Metrics {
    pub fn new() -> Metrics {
        let seconds = || exponential_buckets(0.000_1, 2.0, 18).expect("valid buckets");
        let m = Metrics {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new(
                    "twotower_requests_total",
                    "gRPC requests by RPC and status code",
                ),
                &["rpc", "code"],
            )
            .expect("valid metric"),
            latency: HistogramVec::new(
                HistogramOpts::new("twotower_request_seconds", "gRPC request latency")
                    .buckets(seconds()),
                &["rpc"],
            )
            .expect("valid metric"),
            user_tower: histogram(
                "twotower_user_tower_seconds",
                "user-tower forward pass time (one micro-batch)",
                0.000_05,
                18,
            ),
            encoder_batch: histogram(
                "twotower_user_tower_batch_size",
                "requests per user-tower forward pass",
                1.0,
                8,
            ),
            faiss: histogram(
                "twotower_faiss_seconds",
                "FAISS search and exact filtering time per request",
                0.000_02,
                18,
            ),
            coarse: histogram(
                "twotower_coarse_search_seconds",
                "IVF coarse search time (one micro-batch of two or more users)",
                0.000_01,
                18,
            ),
            version: IntGaugeVec::new(
                Opts::new(
                    "twotower_index_version",
                    "1 for the index and model versions served",
                ),
                &["index_version", "model_version"],
            )
            .expect("valid metric"),
            events_recorded: IntCounter::new(
                "twotower_events_recorded_total",
                "events made durable by RecordEvents",
            )
            .expect("valid metric"),
            commit_batch: histogram(
                "twotower_event_log_commit_events",
                "events per event-log fsync (group commit)",
                1.0,
                16,
            ),
            reloads: IntCounterVec::new(
                Opts::new("twotower_reloads_total", "reload attempts by result"),
                &["result"],
            )
            .expect("valid metric"),
            events_unknown_item: IntCounter::new(
                "twotower_events_unknown_item_total",
                "recorded events whose item id is not in the served index",
            )
            .expect("valid metric"),
            compactions: IntCounterVec::new(
                Opts::new(
                    "twotower_event_log_compactions_total",
                    "background event-log compactions by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
            event_log_truncated_bytes: IntCounter::new(
                "twotower_event_log_truncated_bytes_total",
                "bytes of a torn or garbage event-log tail cut off at start-up",
            )
            .expect("valid metric"),
            current_unreadable: IntCounter::new(
                "twotower_current_unreadable_total",
                "reload polls that found INDEX_ROOT/CURRENT empty, garbled or unreadable",
            )
            .expect("valid metric"),
            fallback_version: IntGauge::new(
                "twotower_serving_fallback_version",
                "1 while serving an older index version because the one CURRENT named at start-up was broken",
            )
            .expect("valid metric"),
            events_replayed: IntGauge::new(
                "twotower_events_replayed",
                "events replayed at start-up from the event log or the event bus",
            )
            .expect("valid metric"),
            bus_events_applied: IntCounter::new(
                "twotower_bus_events_applied_total",
                "events applied from the event bus, this replica's and every other one's",
            )
            .expect("valid metric"),
            bus_malformed: IntCounter::new(
                "twotower_bus_malformed_messages_total",
                "event-bus messages that were not event batches (skipped)",
            )
            .expect("valid metric"),
            ready: IntGauge::new(
                "twotower_ready",
                "1 while the server takes requests (what GET /ready answers)",
            )
            .expect("valid metric"),
            admission_limit: IntGauge::new(
                "twotower_admission_limit",
                "requests taken at once now: max_in_flight, or less while requests wait longer than admission_target_ms",
            )
            .expect("valid metric"),
            admission_target: Gauge::new(
                "twotower_admission_target_seconds",
                "time in the server above which an interval's quickest request means a standing queue (admission_target_ms, or measured)",
            )
            .expect("valid metric"),
            connections: IntGauge::new(
                "twotower_connections",
                "client connections open now (bounded by max_connections)",
            )
            .expect("valid metric"),
            connections_refused: IntCounter::new(
                "twotower_connections_refused_total",
                "connections closed as they were accepted, past max_connections",
            )
            .expect("valid metric"),
            metrics_connections: IntGauge::new(
                "twotower_metrics_connections",
                "connections to the metrics endpoint open now",
            )
            .expect("valid metric"),
            metrics_connections_refused: IntCounter::new(
                "twotower_metrics_connections_refused_total",
                "connections to the metrics endpoint closed as they were accepted, past its bound",
            )
            .expect("valid metric"),
            users: IntGauge::new("twotower_users", "users the history store holds")
                .expect("valid metric"),
            seen_items: IntGauge::new(
                "twotower_seen_items",
                "seen items summed over users (what exclude_seen removes; grows with new user-item pairs)",
            )
            .expect("valid metric"),
        };
        let r = &m.registry;
        let all: [Box<dyn prometheus::core::Collector>; 27] = [
            Box::new(m.requests.clone()),
            Box::new(m.latency.clone()),
            Box::new(m.user_tower.clone()),
            Box::new(m.encoder_batch.clone()),
            Box::new(m.faiss.clone()),
            Box::new(m.coarse.clone()),
            Box::new(m.version.clone()),
            Box::new(m.events_recorded.clone()),
            Box::new(m.commit_batch.clone()),
            Box::new(m.reloads.clone()),
            Box::new(m.events_unknown_item.clone()),
            Box::new(m.compactions.clone()),
            Box::new(m.event_log_truncated_bytes.clone()),
            Box::new(m.current_unreadable.clone()),
            Box::new(m.fallback_version.clone()),
            Box::new(m.events_replayed.clone()),
            Box::new(m.bus_events_applied.clone()),
            Box::new(m.bus_malformed.clone()),
            Box::new(m.ready.clone()),
            Box::new(m.admission_limit.clone()),
            Box::new(m.admission_target.clone()),
            Box::new(m.connections.clone()),
            Box::new(m.connections_refused.clone()),
            Box::new(m.metrics_connections.clone()),
            Box::new(m.metrics_connections_refused.clone()),
            Box::new(m.users.clone()),
            Box::new(m.seen_items.clone()),
        ];
        for c in all {
            r.register(c).expect("metric names are unique");
        }
        m
    }

    /// Marks `index`/`model` as the served versions (and no others).
    pub fn set_version(&self, index: &str, model: &str) {
        self.version.reset();
        self.version.with_label_values(&[index, model]).set(1);
    }

    /// Sets the gauges of what the history store holds.
    pub fn set_store_size(&self, store: &crate::history::HistoryStore) {
        self.users.set(store.user_count() as i64);
        self.seen_items.set(store.seen_count() as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Metrics {
    /// The gauges of gRPC client connections (`max_connections`).
    pub fn grpc_connection_gauges(&self) -> ConnectionGauges {
        ConnectionGauges {
            open: self.connections.clone(),
            refused: self.connections_refused.clone(),
        }
    }

    /// The gauges of this metrics endpoint's own connections.
    pub fn endpoint_connection_gauges(&self) -> ConnectionGauges {
        ConnectionGauges {
            open: self.metrics_connections.clone(),
            refused: self.metrics_connections_refused.clone(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Serves `GET /metrics`, and `GET /ready` (200 while the server takes requests, 503 before
/// and during shutdown: an HTTP health check for load balancers), until `shutdown` completes.
/// Its connections are bounded like the gRPC ones (`connections.rs`), so that silent clients
/// cannot use up the descriptors, or shut out the scraper and the health checks.
pub async fn serve(
    listener: crate::connections::BoundedListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let for_ready = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route(
            "/ready",
            axum::routing::get(move || {
                let ready = for_ready.ready.get() == 1;
                async move {
                    if ready {
                        (axum::http::StatusCode::OK, "ready\n")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics address (so a port clash fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// The metrics endpoint's listener, under its bound
/// ([`METRICS_MAX_CONNECTIONS`](crate::connections::METRICS_MAX_CONNECTIONS) connections, closed
/// after [`METRICS_IDLE_TIMEOUT`](crate::connections::METRICS_IDLE_TIMEOUT) of silence and
/// after [`METRICS_LIFETIME`](crate::connections::METRICS_LIFETIME) in any case).
pub fn bounded_listener(
    listener: tokio::net::TcpListener,
    metrics: &Metrics,
) -> crate::connections::BoundedListener {
    use crate::connections::{
        BoundedListener, Deadline, METRICS_IDLE_TIMEOUT, METRICS_LIFETIME, METRICS_MAX_CONNECTIONS,
    };
    BoundedListener::new(
        listener,
        METRICS_MAX_CONNECTIONS,
        Deadline::Idle {
            idle: METRICS_IDLE_TIMEOUT,
            lifetime: METRICS_LIFETIME,
        },
        metrics.endpoint_connection_gauges(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connections::{BoundedListener, Deadline};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// `GET /ready` on a new connection: the response, or what the closed connection gave.
    async fn ready(addr: SocketAddr) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let _ = c
            .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "the metrics endpoint answered or closed within 5 s"
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn silent_connections_cannot_shut_the_health_check_out_of_the_metrics_endpoint() {
        let metrics = Arc::new(Metrics::new());
        metrics.ready.set(1);
        let tcp = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = BoundedListener::new(
            tcp,
            2,
            Deadline::Idle {
                idle: Duration::from_millis(500),
                lifetime: Duration::from_secs(60),
            },
            metrics.endpoint_connection_gauges(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve(listener, metrics.clone(), async move {
            let _ = stopped.await;
        }));
        assert!(ready(addr).await.contains("200 OK"));
        // Two clients that connect and say nothing fill the bound...
        let _silent = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(metrics.metrics_connections.get(), 2);
        // ...so a third is closed at once, and counted...
        assert_eq!(ready(addr).await, "");
        assert_eq!(metrics.metrics_connections_refused.get(), 1);
        // ...until their idle timeout closes them, and the health check is answered again.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(metrics.metrics_connections.get(), 0);
        assert!(ready(addr).await.contains("200 OK"));
        let _ = stop.send(());
        served.await.unwrap().unwrap();
    }
}
