//! Start-up, wiring and shutdown: loads model, index and history, opens the event log, starts
//! the workers, the reload watcher and the metrics endpoint, and serves `Recommender`, health
//! and reflection until told to stop.
//!
//! Shutdown order: health turns NOT_SERVING, the listener stops accepting, in-flight requests
//! drain (at most `shutdown_grace_ms`), then the event log commits what is queued and closes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tch::Device;
use tokio::sync::{oneshot, watch};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::admission::Admission;
use crate::admit::Admit;
use crate::bus::BusSettings;
use crate::commit::{AutoCompaction, Committer};
use crate::compact::{self, CompactSettings};
use crate::config::ServeConfig;
use crate::connections::{self, Deadline};
use crate::dedup::DedupWindow;
use crate::encoder::Encoder;
use crate::error::{Error, Result};
use crate::eventlog::EventLog;
use crate::gate::Gate;
use crate::history::HistoryStore;
use crate::metrics::{self, Metrics};
use crate::proto::recommender_server::RecommenderServer;
use crate::recorder::{EventStore, Recorder};
use crate::reload::Reloader;
use crate::seed;
use crate::service::{RecommenderService, Shared};
use crate::snapshot::{IndexSlot, ModelSlot, Snapshot};

/// The name health checks ask about: the generated service's own, so it follows the proto.
pub const SERVICE_NAME: &str =
    <RecommenderServer<RecommenderService> as tonic::server::NamedService>::NAME;

/// How long past `request_timeout_ms` the transport waits before it drops a request whose
/// handler has not answered (in practice, one whose body never came).
const BODY_TIMEOUT_MARGIN: Duration = Duration::from_secs(1);

/// PEM files of the server's certificate chain and private key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Paths, addresses and switches of one server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model_dir: PathBuf,
    pub index_root: PathBuf,
    pub data_dir: PathBuf,
    /// Where recorded events are kept: the local event log or the event bus.
    pub events: EventStore,
    pub addr: SocketAddr,
    /// Where `/metrics` is served; `None` for no metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
    pub tls: Option<TlsFiles>,
    /// Bearer token `Recommender` calls must carry; `None` for no check.
    pub auth_token: Option<String>,
    pub device: Device,
    pub config: ServeConfig,
    /// Fail at start-up when the version `CURRENT` names is broken, instead of starting on the
    /// newest complete version that loads (with a warning and `twotower_serving_fallback_version`).
    pub strict: bool,
}

/// A started server.
pub struct Running {
    /// The bound gRPC address (the real port when `addr` asked for port 0).
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    /// Shuts down gracefully and waits until the event log is closed.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.wait().await
    }

    /// Serves until `signal` completes (then shuts down gracefully) or the server fails.
    pub async fn run_until(mut self, signal: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::select! {
            _ = signal => {
                if let Some(stop) = self.stop.take() {
                    let _ = stop.send(());
                }
            }
            r = &mut self.task => {
                return r.map_err(|e| Error::Transport(format!("server task failed: {e}")))?;
            }
        }
        self.wait().await
    }

    /// Waits until the server ends (after [`stop`](Self::stop) or a serving error).
    pub async fn wait(self) -> Result<()> {
        self.task
            .await
            .map_err(|e| Error::Transport(format!("server task failed: {e}")))?
    }
}

/// History loaded before the first request.
struct Loaded {
    model: ModelSlot,
    store: Arc<HistoryStore>,
    counts: seed::Counts,
    dedup: DedupWindow,
    events: Opened,
}

/// Where events are kept, after the synchronous part of start-up.
enum Opened {
    /// The event log, replayed.
    Log {
        log: EventLog,
        /// Events it held.
        replayed: u64,
        /// Bytes of a torn tail cut off while replaying.
        truncated_bytes: u64,
    },
    /// The event bus, replayed afterwards (asynchronously).
    Bus(BusSettings),
}

/// Loads the model and the prepared data's histories, then replays the event log when events
/// are kept in one (the bus is replayed afterwards, asynchronously).
fn load(opts: &ServeOptions) -> Result<Loaded> {
    let cfg = &opts.config;
    let model = ModelSlot::load(&opts.model_dir, cfg.encoder_workers, opts.device)?;
    let data = features::layout::DatasetInfo::load(&opts.data_dir)?;
    if data.vocab_checksum != model.info.vocab_checksum {
        return Err(Error::Mismatch(format!(
            "{} was prepared with vocabulary {}, but the model uses {}; serve the data the model was trained on",
            opts.data_dir.display(),
            towers::artifact::short(&data.vocab_checksum),
            towers::artifact::short(&model.info.vocab_checksum)
        )));
    }
    let store = Arc::new(HistoryStore::new(
        model.info.tower.history_len + opts.config.history_slack,
        data.settings.split.ties,
        data.settings.split.history,
    ));
    let mut counts = seed::seed(&store, &opts.data_dir)?;
    let mut dedup = DedupWindow::new(opts.config.idempotency_window);
    let path = match &opts.events {
        EventStore::Log(path) => path,
        EventStore::Bus(settings) => {
            return Ok(Loaded {
                model,
                store,
                counts,
                dedup,
                events: Opened::Bus(settings.clone()),
            })
        }
    };
    let (mut log, replay) = EventLog::open(path, &mut |record| {
        seed::apply_record(&store, Some(&mut counts), &mut dedup, record)
    })?;
    // Compact before serving when the log is large and mostly events a compaction would drop
    // (more than twice what it keeps); a freshly compacted log is left alone.
    let compaction = compact_settings(&store, &opts.config);
    let kept_at_most = (store.user_count() * compaction.keep) as u64;
    if opts.config.compact_log_bytes > 0
        && log.len() > opts.config.compact_log_bytes
        && replay.events > 2 * kept_at_most
    {
        compact::compact(log.path(), log.len(), &compaction)?.swap_into(&mut log)?;
    }
    tracing::info!(
        users = store.user_count(),
        replayed_events = replay.events,
        log = %path.display(),
        "history loaded"
    );
    Ok(Loaded {
        model,
        store,
        counts,
        dedup,
        events: Opened::Log {
            log,
            replayed: replay.events,
            truncated_bytes: replay.truncated_bytes,
        },
    })
}

/// What compaction must keep so that a compacted log replays to this store.
fn compact_settings(store: &HistoryStore, cfg: &ServeConfig) -> CompactSettings {
    CompactSettings {
        keep: store.bound().max(compact::MIN_KEPT_EVENTS),
        ties: store.ties(),
        protocol: store.protocol(),
        window: cfg.idempotency_window,
    }
}

/// The snapshot to start on: the version `CURRENT` names; or, when that one does not load or
/// does not belong to the model and `strict` is off, the newest other complete version that
/// does. A running server keeps its old version when a broken one is published; a restarted
/// one must not be worse off. Returns whether it fell back.
fn start_snapshot(
    root: &std::path::Path,
    model: Arc<ModelSlot>,
    counts: &seed::Counts,
    strict: bool,
) -> Result<(Snapshot, bool)> {
    let open = |version: Option<&str>| {
        IndexSlot::load(root, version, counts)
            .and_then(|index| Snapshot::pair(model.clone(), Arc::new(index)))
    };
    let named_err = match open(None) {
        Ok(s) => return Ok((s, false)),
        Err(e) if strict => return Err(e),
        Err(e) => e,
    };
    let index_root = indexer::IndexRoot::new(root);
    let named = index_root.current().ok().flatten();
    let candidates = index_root.versions().unwrap_or_default();
    for version in candidates
        .iter()
        .rev()
        .filter(|v| Some(*v) != named.as_ref())
    {
        match open(Some(version)) {
            Ok(s) => {
                tracing::warn!(
                    current = named.as_deref().unwrap_or("(unreadable)"),
                    error = %named_err,
                    serving = %version,
                    "FALLBACK: the index version CURRENT names cannot be served; starting on the newest complete version that can (fix or re-point CURRENT; --strict refuses to start instead)"
                );
                return Ok((s, true));
            }
            Err(e) => tracing::warn!(version = %version, error = %e, "fallback candidate rejected"),
        }
    }
    Err(named_err)
}

fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| Error::io(p, e));
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?)))
}

/// Loads everything, binds the addresses and starts serving in a background task.
pub async fn start(opts: ServeOptions) -> Result<Running> {
    let cfg = opts.config.clone();
    cfg.validate()?;
    tch::set_num_threads(cfg.torch_threads as i32);
    let metrics = Arc::new(Metrics::new());
    let Loaded {
        model,
        store,
        mut counts,
        dedup,
        events,
    } = {
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || load(&opts))
            .await
            .map_err(|e| Error::Transport(format!("start-up task failed: {e}")))??
    };
    let (down_tx, down_rx) = watch::channel(false);
    // The bus is followed until requests have drained, so that they still see their own events.
    let (bus_down_tx, bus_down_rx) = watch::channel(false);
    let mut committer = None;
    let mut bus_task = None;
    let recorder = match events {
        Opened::Bus(settings) => {
            let bus = crate::bus::start(
                &settings,
                store.clone(),
                &mut counts,
                dedup,
                metrics.clone(),
                bus_down_rx,
            )
            .await?;
            metrics.events_replayed.set(bus.replayed_events as i64);
            bus_task = Some(bus.consumer);
            Recorder::Bus(bus.handle)
        }
        Opened::Log {
            log,
            replayed,
            truncated_bytes,
        } => {
            metrics.events_replayed.set(replayed as i64);
            metrics.event_log_truncated_bytes.inc_by(truncated_bytes);
            let compaction = (cfg.compact_log_bytes > 0).then(|| AutoCompaction {
                settings: compact_settings(&store, &cfg),
                threshold: cfg.compact_log_bytes,
            });
            let c = Committer::start(
                log,
                store.clone(),
                metrics.clone(),
                dedup,
                compaction,
                cfg.max_users,
            );
            let handle = c.handle();
            committer = Some(c);
            Recorder::Log(handle)
        }
    };
    metrics.set_store_size(&store);
    let counts = Arc::new(counts);
    let (snapshot, fallback) = {
        let (root, strict, counts) = (opts.index_root.clone(), opts.strict, counts.clone());
        let model = Arc::new(model);
        tokio::task::spawn_blocking(move || start_snapshot(&root, model, &counts, strict))
            .await
            .map_err(|e| Error::Transport(format!("start-up task failed: {e}")))??
    };
    metrics.set_version(snapshot.index_version(), snapshot.model_version());
    metrics.fallback_version.set(fallback as i64);
    tracing::info!(
        index_version = snapshot.index_version(),
        model_version = snapshot.model_version(),
        items = snapshot.index.version.embeddings.len(),
        users = store.user_count(),
        events = %opts.events,
        "serving"
    );
    let current = Arc::new(ArcSwap::from_pointee(snapshot));
    let encoder = Encoder::start(cfg.encoder_workers, cfg.max_encoder_batch, metrics.clone());
    let shared = Arc::new(Shared {
        snapshot: current.clone(),
        store,
        encoder: encoder.handle(),
        events: recorder,
        metrics: metrics.clone(),
        config: cfg.clone(),
        admission: Admission::new(
            cfg.max_in_flight,
            cfg.encoder_workers,
            cfg.admission_target_ms,
        ),
    });

    let bind_err = |addr: SocketAddr| move |e| Error::Transport(format!("binding {addr}: {e}"));
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(bind_err(opts.addr))?;
    let addr = listener.local_addr().map_err(bind_err(opts.addr))?;
    let metrics_listener = match opts.metrics_addr {
        Some(a) => Some(metrics::bind(a).await.map_err(bind_err(a))?),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().map_err(bind_err(addr))?),
        None => None,
    };

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RecommenderServer<RecommenderService>>()
        .await;
    fn reflection(
        b: tonic_reflection::server::Builder<'static>,
    ) -> tonic_reflection::server::Builder<'static> {
        b.register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    }
    let reflection_err =
        |e: tonic_reflection::server::Error| Error::Transport(format!("reflection: {e}"));
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(reflection_err)?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(reflection_err)?;
    let admission = Arc::clone(&shared.admission);
    let recommender = RecommenderServer::new(RecommenderService::new(shared))
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes.max(16 << 20));
    // The token check first, then the admission limit, both from the headers alone.
    let recommender = InterceptedService::new(
        Admit::new(recommender, admission, metrics.clone()),
        Gate::new(opts.auth_token.clone()),
    );

    // A backstop past the handlers' own deadline (which answers DEADLINE_EXCEEDED first): a
    // request whose body never comes (it holds no admission place, `admit.rs`) is dropped then.
    let backstop = Duration::from_millis(cfg.request_timeout_ms) + BODY_TIMEOUT_MARGIN;
    let mut builder = Server::builder()
        .timeout(backstop)
        .max_concurrent_streams(Some(cfg.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_millis(cfg.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)));
    if let Some(files) = &opts.tls {
        builder = builder
            .tls_config(tls_config(files)?)
            .map_err(|e| Error::Transport(format!("TLS: {e}")))?;
    }
    let router = builder
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(recommender);

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let reloader = Reloader {
        model_dir: opts.model_dir.clone(),
        index_root: opts.index_root.clone(),
        device: opts.device,
        model_copies: cfg.encoder_workers,
        counts,
        current,
        metrics: metrics.clone(),
        interval: Duration::from_millis(cfg.reload_interval_ms),
        lease_holder: lease_holder(),
    };
    let reload_task = tokio::spawn(reloader.run(down_rx.clone()));
    let metrics_task = metrics_listener.map(|l| {
        let mut down = down_rx.clone();
        let l = metrics::bounded_listener(l, &metrics);
        tokio::spawn(metrics::serve(l, metrics.clone(), async move {
            let _ = down.wait_for(|d| *d).await;
        }))
    });
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    let max_connections = connections::fit_to_descriptors(cfg.max_connections);
    let incoming = connections::BoundedListener::new(
        listener,
        max_connections,
        Deadline::handshake(Duration::from_millis(cfg.handshake_timeout_ms)),
        metrics.grpc_connection_gauges(),
    );
    metrics.ready.set(1);
    let ready = metrics.clone();
    let task = tokio::spawn(async move {
        let signal = async move {
            let _ = stop_rx.await;
            tracing::info!("shutting down: no new requests; draining");
            ready.ready.set(0);
            reporter
                .set_not_serving::<RecommenderServer<RecommenderService>>()
                .await;
            let _ = down_tx.send(true);
        };
        let serve = router.serve_with_incoming_shutdown(incoming.into_incoming(), signal);
        let mut down = down_rx.clone();
        let served = tokio::select! {
            r = serve => r.map_err(|e| Error::Transport(format!("serving: {e}"))),
            _ = async {
                let _ = down.wait_for(|d| *d).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!("shutdown grace period over; closing with requests still open");
                Ok(())
            }
        };
        encoder.close();
        if let Some(committer) = committer {
            tokio::task::spawn_blocking(move || committer.close())
                .await
                .map_err(|e| Error::Transport(format!("closing the event log: {e}")))?;
        }
        if let Some(t) = bus_task {
            let _ = bus_down_tx.send(true);
            let _ = t.await;
        }
        let _ = reload_task.await;
        if let Some(mut t) = metrics_task {
            // Its connections are bounded in time (`connections.rs`); this bounds the wait for
            // them all the same, so that shutdown always ends.
            if tokio::time::timeout(grace, &mut t).await.is_err() {
                t.abort();
            }
        }
        tracing::info!("stopped; event log flushed");
        served
    });
    Ok(Running {
        addr,
        metrics_addr,
        stop: Some(stop_tx),
        task,
    })
}

/// A name for this server's index lease, unique among the servers sharing an index root: the
/// host name (containers share PIDs, not host names), the PID and the start time.
fn lease_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{started:x}",
        if host.is_empty() { "server" } else { &host },
        std::process::id()
    )
}

/// Waits for SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
