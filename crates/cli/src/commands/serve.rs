//! `twotower serve` and `twotower bench serve`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use server::bench::{BenchOptions, Load};
use server::client::ClientOptions;
use server::{BusSettings, EventStore, ServeConfig, ServeOptions, TlsFiles};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The trained model directory (`twotower train --out`). Watched: a new model.json is loaded
    /// once an index built with it is published.
    #[arg(long)]
    model: PathBuf,
    /// INDEX_ROOT (`twotower index --out`). Its CURRENT file is watched; a new version is loaded,
    /// checked and swapped in without downtime.
    #[arg(long)]
    index: PathBuf,
    /// The prepared data (DATA_DIR): users' histories and item popularity start from its
    /// events.parquet and users.parquet.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    settings: ServeSettings,
}

/// How to serve: the flags of `twotower serve` besides its inputs, or a pipeline's `[serve]`
/// table.
#[derive(Debug, Clone, Args, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ServeSettings {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: SocketAddr,
    /// Prometheus `/metrics` listen address.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// Do not serve metrics.
    #[arg(long)]
    pub no_metrics: bool,
    /// Serving settings (TOML): reload interval, limits, worker threads (docs/operations.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where recorded events are logged (default: next to INDEX_ROOT, `<INDEX_ROOT>.events.log`).
    /// Keep it: it is replayed at start-up.
    #[arg(long, conflicts_with = "events")]
    pub event_log: Option<PathBuf>,
    /// Record events to a NATS JetStream stream instead of a local log, e.g.
    /// `nats://nats:4222`: every replica on the same stream serves every replica's events.
    #[arg(long, value_name = "URL")]
    pub events: Option<String>,
    /// The JetStream stream events go to (created if missing; its subject is
    /// `<stream, lower-cased>.batches`). Replicas that share history share the stream.
    #[arg(long, default_value = "TWOTOWER_EVENTS", requires = "events")]
    pub events_stream: String,
    /// Oldest event the stream keeps when this server creates it, in hours (0: no limit). It
    /// bounds what a starting replica replays.
    #[arg(long, default_value_t = 0, requires = "events")]
    pub events_max_age_hours: u64,
    /// TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// File holding a bearer token every Recommender call must carry (health stays open).
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// Where the user tower runs: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Refuse to start when the index version CURRENT names is broken. By default the server
    /// starts on the newest complete version that loads, with a loud warning and the metric
    /// `twotower_serving_fallback_version`.
    #[arg(long)]
    pub strict: bool,
}

impl Default for ServeSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl ServeArgs {
    /// Serve `model`, `index` and `data` with `settings`.
    pub fn new(model: PathBuf, index: PathBuf, data: PathBuf, settings: ServeSettings) -> Self {
        ServeArgs {
            model,
            index,
            data,
            settings,
        }
    }
}

fn default_event_log(index: &Path) -> PathBuf {
    let mut name = index
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "index".into());
    name.push(".events.log");
    index.with_file_name(name)
}

/// Bus settings from the flags, with a stream name JetStream accepts.
fn bus_settings(url: String, stream: &str, max_age_hours: u64) -> anyhow::Result<BusSettings> {
    if !url.starts_with("nats://") && !url.starts_with("tls://") {
        anyhow::bail!("--events {url}: expected a NATS URL such as nats://localhost:4222");
    }
    if stream.is_empty()
        || !stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        anyhow::bail!(
            "--events-stream {stream:?}: a stream name is letters, digits, '_' and '-' only"
        );
    }
    let mut s = BusSettings::new(url, stream);
    s.max_age = std::time::Duration::from_secs(max_age_hours * 3600);
    Ok(s)
}

fn options(args: ServeArgs) -> anyhow::Result<ServeOptions> {
    let s = args.settings;
    // The command line checks these relations itself; a pipeline table does not.
    if s.events.is_some() && s.event_log.is_some() {
        anyhow::bail!("--event-log and --events exclude each other: events go to one store");
    }
    let defaults = ServeSettings::default();
    if s.events.is_none()
        && (s.events_stream != defaults.events_stream || s.events_max_age_hours != 0)
    {
        anyhow::bail!("--events-stream and --events-max-age-hours need --events");
    }
    let config = match &s.config {
        Some(p) => serving_config(p)?,
        None => ServeConfig::default(),
    };
    let auth_token = match &s.auth_token_file {
        Some(p) => Some(server::client::read_token(p).context("reading --auth-token-file")?),
        None => None,
    };
    let tls = match (s.tls_cert, s.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    let events = match s.events {
        Some(url) => EventStore::Bus(bus_settings(url, &s.events_stream, s.events_max_age_hours)?),
        None => EventStore::Log(
            s.event_log
                .unwrap_or_else(|| default_event_log(&args.index)),
        ),
    };
    Ok(ServeOptions {
        events,
        model_dir: args.model,
        index_root: args.index,
        data_dir: args.data,
        addr: s.addr,
        metrics_addr: (!s.no_metrics).then_some(s.metrics_addr),
        tls,
        auth_token,
        device: super::device(&s.device)?,
        config,
        strict: s.strict,
    })
}

/// The serving settings file of `--config`. A pipeline file (whose tables `ServeConfig` rejects
/// as unknown keys) is refused by name: its `[serve]` table holds these flags, not the settings.
fn serving_config(path: &Path) -> anyhow::Result<ServeConfig> {
    ServeConfig::from_toml_file(path).or_else(|e| {
        if crate::pipeline::file::is_pipeline_file(path) {
            anyhow::bail!(
                "{}: a pipeline file is not a serving settings file; put the settings (docs/operations.md) in their own file and name it with `config = \"...\"` in its [serve] table",
                path.display()
            );
        }
        Err(e).with_context(|| format!("reading serving settings from {}", path.display()))
    })
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let opts = options(args)?;
    // The runtime's threads (request I/O, decoding, refusals) run below the user-tower workers,
    // so that under overload the admitted requests are computed first (`server::priority`). The
    // value is taken here, on the thread the workers inherit their priority from.
    let nice = match opts.config.grpc_thread_nice {
        0 => None,
        by => Some(
            server::priority::below_this_thread(by).context("reading this thread's nice value")?,
        ),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("grpc")
        .on_thread_start(move || {
            if let Some(nice) = nice {
                if let Err(e) = server::priority::set_this_thread_nice(nice) {
                    tracing::warn!(nice, error = %e, "could not lower a gRPC thread's priority (grpc_thread_nice)");
                }
            }
        })
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let running = server::start(opts.clone()).await.with_context(|| {
            format!(
                "starting the server (model {}, index {}, data {})",
                opts.model_dir.display(),
                opts.index_root.display(),
                opts.data_dir.display()
            )
        })?;
        tracing::info!(
            addr = %running.addr,
            metrics = ?running.metrics_addr,
            events = %opts.events,
            "listening; SIGTERM or Ctrl-C stops gracefully"
        );
        running.run_until(server::shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Closed loop: this many callers, each sending the next request when the last answered.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: requests per second on a fixed schedule; latency counts from each scheduled time.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// A prepared DATA_DIR to draw real user and item ids from (else user ids 1..=1000).
    #[arg(long)]
    users_from: Option<PathBuf>,
    #[arg(short, long, default_value_t = 10)]
    k: u32,
    /// Share of Recommend requests with inline events.
    #[arg(long, default_value_t = 0.2)]
    inline_fraction: f64,
    /// Concurrent RecordEvents callers alongside the load (0: none).
    #[arg(long, default_value_t = 1)]
    recorders: usize,
    /// Events per RecordEvents request.
    #[arg(long, default_value_t = 100)]
    record_batch: usize,
    /// Events per second the recorders send in all (default: as fast as they are answered).
    #[arg(long)]
    record_rate: Option<f64>,
    /// gRPC connections to spread the load over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// CA certificate (PEM) for an https:// server.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn bench(args: BenchServeArgs) -> anyhow::Result<()> {
    let load = match (args.concurrency, args.rate) {
        (Some(c), None) if c > 0 => Load::Closed { concurrency: c },
        (None, Some(r)) if r > 0.0 && r.is_finite() => Load::Open { rate: r },
        (None, None) => anyhow::bail!("give --concurrency C (closed loop) or --rate R (open loop)"),
        _ => anyhow::bail!("--concurrency must be at least 1 and --rate a positive number"),
    };
    if args
        .record_rate
        .is_some_and(|r| !(r > 0.0 && r.is_finite()))
    {
        anyhow::bail!("--record-rate must be a positive number of events per second");
    }
    if args.record_rate.is_some() && args.recorders == 0 {
        anyhow::bail!("--record-rate needs at least one recorder (--recorders N)");
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        anyhow::bail!("--duration must be a positive number of seconds");
    }
    let token = match &args.auth_token_file {
        Some(p) => Some(server::client::read_token(p).context("reading --auth-token-file")?),
        None => None,
    };
    let opts = BenchOptions {
        client: ClientOptions {
            url: args.addr.clone(),
            token,
            ca: args.tls_ca,
            timeout: Some(Duration::from_secs(10)),
        },
        load,
        duration: Duration::from_secs_f64(args.duration),
        users_from: args.users_from,
        k: args.k,
        inline_fraction: args.inline_fraction,
        recorders: args.recorders,
        record_batch: args.record_batch,
        record_rate: args.record_rate,
        connections: args.connections,
        seed: args.seed,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime
        .block_on(server::bench::run(opts))
        .with_context(|| format!("benchmarking {}", args.addr))?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.out {
        std::fs::write(out, &json).with_context(|| format!("writing {}", out.display()))?;
    }
    outln!("{json}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_file_given_as_serving_settings_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = dir.path().join("p.toml");
        std::fs::write(
            &pipeline,
            "[prepare]\ndataset = 'ml-100k'\n[serve]\nstrict = true\n",
        )
        .unwrap();
        let err = format!("{:#}", serving_config(&pipeline).unwrap_err());
        assert!(
            err.contains("a pipeline file is not a serving settings file"),
            "{err}"
        );
        let settings = dir.path().join("s.toml");
        std::fs::write(&settings, "encoder_workers = 3\n").unwrap();
        assert_eq!(serving_config(&settings).unwrap().encoder_workers, 3);
        std::fs::write(&settings, "nope = 1\n").unwrap();
        let err = format!("{:#}", serving_config(&settings).unwrap_err());
        assert!(
            err.contains("reading serving settings") && err.contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn the_event_log_defaults_next_to_the_index_root() {
        assert_eq!(
            default_event_log(Path::new("/work/index")),
            Path::new("/work/index.events.log")
        );
        assert_eq!(
            default_event_log(Path::new("idx/")),
            Path::new("idx.events.log")
        );
    }
}
