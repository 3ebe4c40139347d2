//! `twotower bench serve`: a load generator for a running server.
//!
//! Two modes. Closed loop (`concurrency`): that many callers each send the next `Recommend` as
//! soon as the last one answered; the throughput is the most the server sustains. Open loop
//! (`rate`): requests are scheduled at a fixed rate whatever the server does, and each latency is
//! measured from its *scheduled* send time, so a stall shows up in every request it delayed
//! (no coordinated omission). Alongside either, recorders send `RecordEvents` batches in a loop.
//!
//! Requests look like real traffic: user ids (and items for inline events) come from a prepared
//! dataset's `events.parquet` when given.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::client::{self, Client, ClientOptions};
use crate::convert::now_ms;
use crate::error::{Error, Result};
use crate::proto;

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    Closed { concurrency: usize },
    Open { rate: f64 },
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub client: ClientOptions,
    pub load: Load,
    pub duration: Duration,
    /// A prepared dataset to draw user and item ids from.
    pub users_from: Option<PathBuf>,
    pub k: u32,
    /// Share of `Recommend` requests that carry inline events.
    pub inline_fraction: f64,
    /// Concurrent `RecordEvents` callers (0: none).
    pub recorders: usize,
    /// Events per `RecordEvents` request.
    pub record_batch: usize,
    /// Events per second over all recorders (`None`: each sends as fast as answers come back).
    pub record_rate: Option<f64>,
    /// gRPC connections to spread requests over.
    pub connections: usize,
    pub seed: u64,
}

/// What `bench serve` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub mode: String,
    pub duration_s: f64,
    pub requests: u64,
    pub qps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Requests refused with `RESOURCE_EXHAUSTED` (admission control); not in the latencies.
    pub refused: u64,
    /// Other failed requests.
    pub errors: u64,
    pub record_requests: u64,
    /// `RecordEvents` calls refused with `RESOURCE_EXHAUSTED` (admission control).
    pub record_refused: u64,
    /// Other failed `RecordEvents` calls.
    pub record_errors: u64,
    pub events_recorded: u64,
    pub events_per_sec: f64,
    /// The load generator's own CPU time over the run, in percent of one core, and the cores it
    /// may run on. A generator near `100 × client_cores` is itself the bottleneck: its requests
    /// go out late, and (measured from when they were due) that lateness counts as latency.
    pub client_cpu_percent: f64,
    pub client_cores: usize,
    /// Open loop: the 99th percentile of how late the generator started a request against its
    /// schedule (0 in a closed loop). That lateness is inside every latency above; where it is a
    /// large share of p99, the figure measures the generator more than the server.
    pub send_late_p99_ms: f64,
}

/// User plus system CPU time of this process so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

struct Pool {
    users: Vec<u64>,
    items: Vec<u64>,
}

fn load_pool(dir: Option<&PathBuf>) -> Result<Pool> {
    let Some(dir) = dir else {
        return Ok(Pool {
            users: (1..=1000).collect(),
            items: Vec::new(),
        });
    };
    let layout = features::layout::DataLayout(dir.clone());
    let (mut users, mut items) = (BTreeSet::new(), BTreeSet::new());
    for batch in features::TableReader::<features::Event>::open(&layout.events())? {
        for e in batch? {
            users.insert(e.user_id);
            if let Some(i) = e.item_id {
                items.insert(i);
            }
        }
    }
    if users.is_empty() {
        return Err(Error::Mismatch(format!("{}: no events", dir.display())));
    }
    Ok(Pool {
        users: users.into_iter().collect(),
        items: items.into_iter().collect(),
    })
}

fn recommend_request(
    pool: &Pool,
    rng: &mut impl Rng,
    k: u32,
    inline: f64,
) -> proto::RecommendRequest {
    let user = pool.users[rng.random_range(0..pool.users.len())];
    let events = if !pool.items.is_empty() && rng.random_bool(inline.clamp(0.0, 1.0)) {
        let now = now_ms();
        (0..rng.random_range(1..=5))
            .map(|i| proto::Event {
                r#type: proto::EventType::View as i32,
                item_id: Some(pool.items[rng.random_range(0..pool.items.len())]),
                query: None,
                ts_ms: now - 1000 * (5 - i),
                value: None,
            })
            .collect()
    } else {
        Vec::new()
    };
    proto::RecommendRequest {
        user_id: Some(user),
        events,
        k,
        ..Default::default()
    }
}

fn record_request(pool: &Pool, rng: &mut impl Rng, n: usize) -> proto::RecordEventsRequest {
    let now = now_ms();
    let items = if pool.items.is_empty() {
        &[1u64][..]
    } else {
        &pool.items[..]
    };
    let users = (0..n)
        .map(|i| proto::UserEvents {
            user_id: pool.users[rng.random_range(0..pool.users.len())],
            events: vec![proto::Event {
                r#type: proto::EventType::View as i32,
                item_id: Some(items[rng.random_range(0..items.len())]),
                query: None,
                ts_ms: now + i as i64,
                value: None,
            }],
        })
        .collect();
    proto::RecordEventsRequest {
        users,
        idempotency_key: String::new(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Runs the benchmark.
pub async fn run(opts: BenchOptions) -> Result<BenchReport> {
    let dir = opts.users_from.clone();
    let pool = Arc::new(
        tokio::task::spawn_blocking(move || load_pool(dir.as_ref()))
            .await
            .map_err(|e| Error::Transport(format!("loading users: {e}")))??,
    );
    let mut clients: Vec<Client> = Vec::new();
    for _ in 0..opts.connections.max(1) {
        clients.push(client::connect(&opts.client).await?);
    }
    // One warm-up call, so connection set-up is not measured.
    clients[0]
        .get_model_info(proto::GetModelInfoRequest {})
        .await
        .map_err(|s| Error::Transport(format!("warm-up call: {}", s.message())))?;

    let stop = Arc::new(AtomicBool::new(false));
    let (rec_ok, rec_err, rec_refused, rec_events) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut recorders = Vec::new();
    for r in 0..opts.recorders {
        let mut c = clients[r % clients.len()].clone();
        let (pool, stop) = (pool.clone(), stop.clone());
        let (ok, err, events) = (rec_ok.clone(), rec_err.clone(), rec_events.clone());
        let refused = rec_refused.clone();
        let (batch, seed) = (opts.record_batch.max(1), opts.seed + 1000 + r as u64);
        // Each recorder's share of the event rate, as a time between calls.
        let pace = opts
            .record_rate
            .map(|rate| Duration::from_secs_f64(batch as f64 * opts.recorders as f64 / rate));
        let deadline = tokio::time::Instant::now() + opts.duration;
        recorders.push(tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut next = tokio::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(pace) = pace {
                    // Never sleep past the run, and never catch up in a burst after a stall.
                    tokio::time::sleep_until(next.min(deadline)).await;
                    let now = tokio::time::Instant::now();
                    if stop.load(Ordering::Relaxed) || now >= deadline {
                        break;
                    }
                    next = (next + pace).max(now);
                }
                let req = record_request(&pool, &mut rng, batch);
                match c.record_events(req).await {
                    Ok(r) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        events.fetch_add(r.into_inner().recorded, Ordering::Relaxed);
                    }
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => {
                        if err.fetch_add(1, Ordering::Relaxed) == 0 {
                            tracing::warn!(code = ?s.code(), message = s.message(), "bench: a RecordEvents call failed");
                        }
                    }
                }
            }
        }));
    }

    let started = Instant::now();
    let cpu_at_start = process_cpu();
    // Open loop: how late each request was started, against its schedule.
    let mut lateness: Vec<f64> = Vec::new();
    let end = started + opts.duration;
    let (mut latencies, refused, errors, mode) = match opts.load {
        Load::Closed { concurrency } => {
            let mut tasks = Vec::new();
            for t in 0..concurrency.max(1) {
                let mut c = clients[t % clients.len()].clone();
                let pool = pool.clone();
                let (k, inline, seed) = (opts.k, opts.inline_fraction, opts.seed + t as u64);
                tasks.push(tokio::spawn(async move {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                    let (mut lat, mut refused, mut errors) = (Vec::new(), 0u64, 0u64);
                    while Instant::now() < end {
                        let req = recommend_request(&pool, &mut rng, k, inline);
                        let sent = Instant::now();
                        match c.recommend(req).await {
                            Ok(_) => lat.push(sent.elapsed().as_secs_f64() * 1e3),
                            Err(s) if s.code() == tonic::Code::ResourceExhausted => refused += 1,
                            Err(_) => errors += 1,
                        }
                    }
                    (lat, refused, errors)
                }));
            }
            let (mut lat, mut refused, mut errors) = (Vec::new(), 0, 0);
            for t in tasks {
                let (l, r, e) = t.await.map_err(|e| Error::Transport(e.to_string()))?;
                lat.extend(l);
                refused += r;
                errors += e;
            }
            (
                lat,
                refused,
                errors,
                format!("closed loop, concurrency {concurrency}"),
            )
        }
        Load::Open { rate } => {
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(Error::setting("rate", "must be a positive number"));
            }
            let interval = Duration::from_secs_f64(1.0 / rate);
            // Each request's latency in ms, or whether it was refused (true) or failed, and how
            // late (ms) the generator started it.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Result<f64, bool>, f64)>();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
            // The schedule is kept by a thread of its own: tokio's timer wheel has 1 ms ticks, so
            // pacing with it would send late and in bursts, and count its own lateness as the
            // server's latency. A thread's sleep is accurate to tens of microseconds.
            let (tick_tx, mut ticks) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            let pacer = std::thread::Builder::new()
                .name("bench-pacer".into())
                .spawn(move || {
                    for i in 0u64.. {
                        let scheduled = started + interval.mul_f64(i as f64);
                        if scheduled >= end {
                            break;
                        }
                        if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        if tick_tx.send(scheduled).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| Error::Transport(format!("starting the pacer thread: {e}")))?;
            let mut i: u64 = 0;
            while let Some(scheduled) = ticks.recv().await {
                let mut c = clients[i as usize % clients.len()].clone();
                let req = recommend_request(&pool, &mut rng, opts.k, opts.inline_fraction);
                let tx = tx.clone();
                tokio::spawn(async move {
                    // Latency counts from when the request was due, not when it went out.
                    let late = scheduled.elapsed().as_secs_f64() * 1e3;
                    let r = c.recommend(req).await;
                    let r = match r {
                        Ok(_) => Ok(scheduled.elapsed().as_secs_f64() * 1e3),
                        Err(s) => Err(s.code() == tonic::Code::ResourceExhausted),
                    };
                    let _ = tx.send((r, late));
                });
                i += 1;
            }
            let _ = pacer.join();
            drop(tx);
            let (mut lat, mut refused, mut errors) = (Vec::new(), 0, 0);
            while let Some((r, late)) = rx.recv().await {
                lateness.push(late);
                match r {
                    Ok(ms) => lat.push(ms),
                    Err(true) => refused += 1,
                    Err(false) => errors += 1,
                }
            }
            (
                lat,
                refused,
                errors,
                format!("open loop, {rate} requests/s"),
            )
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let client_cpu = process_cpu().saturating_sub(cpu_at_start).as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for r in recorders {
        let _ = r.await;
    }
    latencies.sort_by(f64::total_cmp);
    lateness.sort_by(f64::total_cmp);
    let requests = latencies.len() as u64;
    let events = rec_events.load(Ordering::Relaxed);
    Ok(BenchReport {
        mode,
        duration_s: elapsed,
        requests,
        qps: requests as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p90_ms: percentile(&latencies, 0.90),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        refused,
        errors,
        record_requests: rec_ok.load(Ordering::Relaxed),
        record_refused: rec_refused.load(Ordering::Relaxed),
        record_errors: rec_err.load(Ordering::Relaxed),
        events_recorded: events,
        events_per_sec: events as f64 / elapsed,
        client_cpu_percent: 100.0 * client_cpu / elapsed,
        send_late_p99_ms: percentile(&lateness, 0.99),
        client_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
