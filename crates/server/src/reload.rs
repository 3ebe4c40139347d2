//! Hot reload: a background task that follows `INDEX_ROOT/CURRENT` and `MODEL_DIR/model.json`.
//!
//! When either changes, it loads what changed on the blocking pool (the unchanged half is
//! reused), pairs and checks model and index ([`Snapshot::pair`]: same weights, same dim, a probe
//! query answers), and swaps the new snapshot in atomically. Requests already running keep the
//! old one. A version that fails is logged, counted and remembered: it is tried again only after
//! 30 s, then after twice as long each time up to 10 min (so that files copied out of order,
//! `CURRENT` before its version, heal by themselves), or at once when `CURRENT` or `model.json`
//! changes; the old one keeps serving. An empty or garbled
//! `CURRENT` is a warning (once per distinct problem) and a count on every poll.
//!
//! The watcher also keeps this server's lease on the version it serves
//! (`INDEX_ROOT/.leases/HOLDER`), so an indexing job's garbage collection never deletes it.
//!
//! Polling rather than inotify: it works the same on every file system, including network and
//! container volumes, and a second of delay is far below how often indexes are published.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tch::Device;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::seed::Counts;
use crate::snapshot::{IndexSlot, ModelSlot, Snapshot};

/// How often the lease is renewed, well within [`indexer::root::LEASE_TTL`].
const LEASE_RENEWAL: Duration = Duration::from_secs(30);

/// What the watcher needs.
pub struct Reloader {
    pub model_dir: PathBuf,
    pub index_root: PathBuf,
    pub device: Device,
    pub model_copies: usize,
    pub counts: Arc<Counts>,
    pub current: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
    /// This server's lease name under `INDEX_ROOT/.leases`.
    pub lease_holder: String,
}

/// The first wait before a rejected version is tried again, and the longest, in polls: 30 s and
/// 10 min at the default interval of a second.
const REJECTED_RETRY_FIRST_POLLS: u32 = 30;
const REJECTED_RETRY_MAX_POLLS: u32 = 600;

/// What the files say should be served: `model.json`'s bytes and the version `CURRENT` names.
#[derive(Debug, Clone, PartialEq)]
struct Wanted {
    model_json: Vec<u8>,
    index_version: String,
}

impl Reloader {
    /// Polls until `stop` turns true, then gives up the lease.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        // The version last rejected, when it may be tried again, and the wait after that.
        let mut rejected: Option<(Wanted, Instant, Duration)> = None;
        let mut unreadable: Option<String> = None;
        let mut lease = LeaseKeeper::default();
        loop {
            let served = this.current.load().index_version().to_string();
            lease.keep(&this, &served).await;
            tokio::select! {
                _ = tokio::time::sleep(this.interval) => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            let me = this.clone();
            let Ok(wanted) = tokio::task::spawn_blocking(move || me.wanted()).await else {
                continue;
            };
            let wanted = match wanted {
                Ok(Some(w)) => {
                    unreadable = None;
                    w
                }
                Ok(None) => {
                    unreadable = None;
                    continue;
                }
                Err(e) => {
                    this.metrics.current_unreadable.inc();
                    let problem = e.to_string();
                    if unreadable.as_ref() != Some(&problem) {
                        tracing::warn!(error = %problem, "reload: cannot read what to serve; keeping the current version");
                        unreadable = Some(problem);
                    }
                    continue;
                }
            };
            if matches!(&rejected, Some((w, retry_at, _)) if *w == wanted && Instant::now() < *retry_at)
            {
                continue;
            }
            let me = this.clone();
            let w = wanted.clone();
            let loaded = tokio::task::spawn_blocking(move || me.load(&w))
                .await
                .unwrap_or_else(|e| Err(Error::Mismatch(format!("reload task failed: {e}"))));
            match loaded {
                Ok(snap) => {
                    tracing::info!(
                        index_version = snap.index_version(),
                        model_version = snap.model_version(),
                        "reloaded: now serving the new version"
                    );
                    this.metrics
                        .set_version(snap.index_version(), snap.model_version());
                    this.metrics.reloads.with_label_values(&["ok"]).inc();
                    this.metrics.fallback_version.set(0);
                    this.current.store(Arc::new(snap));
                    rejected = None;
                }
                Err(e) => {
                    // The files changed again while loading (a publish in progress): not a
                    // verdict on the new ones, so try them at the next poll.
                    let me = this.clone();
                    let now = tokio::task::spawn_blocking(move || me.wanted()).await;
                    if !matches!(&now, Ok(Ok(Some(w))) if *w == wanted) {
                        tracing::info!(error = %e, "reload: files changed while loading; trying again");
                        continue;
                    }
                    // Tried again after a wait that doubles: files copied out of order (CURRENT
                    // before the version) heal by themselves, and a broken version is not
                    // reloaded at every poll.
                    let wait = match &rejected {
                        Some((w, _, wait)) if *w == wanted => {
                            (*wait * 2).min(this.interval * REJECTED_RETRY_MAX_POLLS)
                        }
                        _ => this.interval * REJECTED_RETRY_FIRST_POLLS,
                    };
                    tracing::error!(
                        index_version = %wanted.index_version,
                        error = %e,
                        retry_in_s = wait.as_secs(),
                        "reload rejected; still serving the previous version"
                    );
                    this.metrics.reloads.with_label_values(&["rejected"]).inc();
                    rejected = Some((wanted, Instant::now() + wait, wait));
                }
            }
        }
        let me = this.clone();
        let _ = tokio::task::spawn_blocking(move || {
            indexer::IndexRoot::new(&me.index_root).remove_lease(&me.lease_holder)
        })
        .await;
    }

    /// What the files name, if it differs from what is served.
    fn wanted(&self) -> Result<Option<Wanted>> {
        let json = towers::ModelLayout(self.model_dir.clone()).info();
        let model_json = std::fs::read(&json).map_err(|e| Error::io(&json, e))?;
        let Some(index_version) = indexer::IndexRoot::new(&self.index_root).current()? else {
            return Ok(None);
        };
        let cur = self.current.load();
        if model_json == cur.model.model_json && index_version == cur.index_version() {
            return Ok(None);
        }
        Ok(Some(Wanted {
            model_json,
            index_version,
        }))
    }

    fn load(&self, wanted: &Wanted) -> Result<Snapshot> {
        let cur = self.current.load_full();
        let model = if wanted.model_json == cur.model.model_json {
            cur.model.clone()
        } else {
            let m = ModelSlot::load(&self.model_dir, self.model_copies, self.device)?;
            if m.model_json != wanted.model_json {
                return Err(Error::Mismatch("model.json changed while loading".into()));
            }
            Arc::new(m)
        };
        let index = if wanted.index_version == cur.index_version() {
            cur.index.clone()
        } else {
            Arc::new(IndexSlot::load(
                &self.index_root,
                Some(&wanted.index_version),
                &self.counts,
            )?)
        };
        Snapshot::pair(model, index)
    }
}

/// Renews the lease when the served version changes or [`LEASE_RENEWAL`] has passed. A root this
/// server cannot write (a read-only volume) gets one warning: serving does not depend on it.
#[derive(Default)]
struct LeaseKeeper {
    written: Option<(String, Instant)>,
    warned: bool,
}

impl LeaseKeeper {
    async fn keep(&mut self, reloader: &Arc<Reloader>, served: &str) {
        let fresh = self
            .written
            .as_ref()
            .is_some_and(|(v, at)| v == served && at.elapsed() < LEASE_RENEWAL);
        if fresh {
            return;
        }
        let me = reloader.clone();
        let version = served.to_string();
        let written = tokio::task::spawn_blocking(move || {
            indexer::IndexRoot::new(&me.index_root).write_lease(&me.lease_holder, &version)
        })
        .await;
        if let Ok(Err(e)) = written {
            if !self.warned {
                tracing::warn!(error = %e, "cannot write this server's lease on its index version; garbage collection may remove it while served");
                self.warned = true;
            }
        }
        // Tried: the next attempt waits for the renewal period either way.
        self.written = Some((served.to_string(), Instant::now()));
    }
}
