//! The user tower, run on dedicated worker threads with micro-batching.
//!
//! A forward pass is CPU-bound libtorch work, so it must never run on the async runtime, where
//! it would stall every other request's network I/O. Requests queue jobs; each worker takes every
//! job waiting (up to `max_batch`), encodes them in one forward pass under `no_grad`, and
//! answers each. Under load, batches grow by themselves and a pass's fixed cost is shared.
//!
//! The workers also run CPU work of requests that need no user vector (a `SimilarItems`
//! search, [`EncoderHandle::run`]): everything an admitted request computes runs on these
//! threads, at their priority, above the async runtime's (`crate::priority`).

use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;
use towers::{EventInput, GatheredItems, UserBatchHost, UserInput};

use indexer::Probes;

use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// One user's vector, or why it could not be computed (our bug: inputs are validated).
pub type Encoded = Result<Vec<f32>, String>;

/// A user's vector, with the inverted lists it probes at the index's default nprobe when the
/// worker found them for its whole micro-batch at once (an IVF index): one product of the batch
/// with the centroids instead of a pass over them per request (`docs/benchmarks.md`, session 30).
#[derive(Debug)]
pub struct UserVector {
    pub vector: Vec<f32>,
    pub probes: Option<Probes>,
}

/// What a worker is asked to do.
enum Job {
    Encode(Encode),
    /// CPU work without a user vector, run as it is.
    Run(Box<dyn Reply<Input = ()>>),
}

/// Where a user's vector goes.
type VectorReply = Box<dyn Reply<Input = UserVector>>;

/// One user to encode.
struct Encode {
    snap: Arc<Snapshot>,
    /// `item_row`s are rows of the snapshot's index embeddings.
    input: UserInput,
    reply: VectorReply,
}

impl Job {
    fn is_closed(&self) -> bool {
        match self {
            Job::Encode(e) => e.reply.is_closed(),
            Job::Run(r) => r.is_closed(),
        }
    }
}

/// Where a job's result goes: straight back to the request, or first through the work the
/// request does next with it ([`EncoderHandle::encode_then`]).
trait Reply: Send {
    /// The user vector, or `()` for work that needs none.
    type Input;
    /// The request gave up (deadline, cancellation): it needs no answer.
    fn is_closed(&self) -> bool;
    fn send(self: Box<Self>, input: Result<Self::Input, String>);
}

/// A reply that first applies `then` to what the worker computed (of type `I`).
struct Then<I, R, F> {
    tx: oneshot::Sender<Result<R, String>>,
    then: F,
    input: PhantomData<fn(I)>,
}

impl<I, R, F> Then<I, R, F> {
    fn new(tx: oneshot::Sender<Result<R, String>>, then: F) -> Self {
        Then {
            tx,
            then,
            input: PhantomData,
        }
    }
}

impl<I, R: Send, F: FnOnce(I) -> R + Send> Reply for Then<I, R, F> {
    type Input = I;

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    fn send(self: Box<Self>, input: Result<I, String>) {
        let Then { tx, then, .. } = *self;
        let result = input.and_then(|v| {
            std::panic::catch_unwind(AssertUnwindSafe(|| then(v))).map_err(|panic| {
                format!(
                    "on a user-tower worker (our bug): {}",
                    panic_message(&*panic)
                )
            })
        });
        let _ = tx.send(result);
    }
}

/// The worker pool.
pub struct Encoder {
    tx: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

/// Cloneable handle for request handlers.
#[derive(Clone)]
pub struct EncoderHandle {
    tx: mpsc::Sender<Job>,
}

impl Encoder {
    /// Starts `workers` threads; worker `i` uses model copy `i` of each snapshot.
    pub fn start(workers: usize, max_batch: usize, metrics: Arc<Metrics>) -> Encoder {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..workers.max(1))
            .map(|i| {
                let (rx, metrics) = (rx.clone(), metrics.clone());
                std::thread::Builder::new()
                    .name(format!("user-tower-{i}"))
                    .spawn(move || worker(i, &rx, max_batch.max(1), &metrics))
                    .expect("spawning a user-tower worker")
            })
            .collect();
        Encoder {
            tx: Some(tx),
            threads,
        }
    }

    pub fn handle(&self) -> EncoderHandle {
        EncoderHandle {
            tx: self.tx.clone().expect("encoder is open"),
        }
    }

    /// Lets the workers stop: each exits once every handle is dropped and the queue is empty.
    /// Does not wait for them (nothing they hold needs flushing).
    pub fn close(mut self) {
        self.tx.take();
        self.threads.clear();
    }
}

impl EncoderHandle {
    /// The user vector of `input` under `snap`'s model.
    pub async fn encode(&self, snap: Arc<Snapshot>, input: UserInput) -> Encoded {
        self.encode_then(snap, input, |user| user.vector).await
    }

    /// `then` applied to the user vector of `input`, on the worker that computed it.
    ///
    /// What a request does next with its vector (the index search) is CPU work as well. Done
    /// on the worker, the request comes back to the async runtime once instead of twice, and
    /// under overload each trip back waits behind every connection's new requests
    /// (`docs/benchmarks.md`, overload).
    pub async fn encode_then<R, F>(
        &self,
        snap: Arc<Snapshot>,
        input: UserInput,
        then: F,
    ) -> Result<R, String>
    where
        R: Send + 'static,
        F: FnOnce(UserVector) -> R + Send + 'static,
    {
        let (tx, done) = oneshot::channel();
        let reply = Box::new(Then::new(tx, then));
        self.send(Job::Encode(Encode { snap, input, reply }))?;
        done.await
            .map_err(|_| "a user-tower worker dropped the request".to_string())?
    }

    /// `work` run on a worker: CPU work of a request that needs no user vector, with the
    /// workers' priority. Skipped if the request gives up before a worker takes it.
    pub async fn run<R, F>(&self, work: F) -> Result<R, String>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (tx, done) = oneshot::channel();
        let then = move |()| work();
        self.send(Job::Run(Box::new(Then::new(tx, then))))?;
        done.await
            .map_err(|_| "a user-tower worker dropped the request".to_string())?
    }

    fn send(&self, job: Job) -> Result<(), String> {
        self.tx
            .send(job)
            .map_err(|_| "the user-tower workers stopped".to_string())
    }
}

fn worker(idx: usize, rx: &Mutex<mpsc::Receiver<Job>>, max_batch: usize, metrics: &Metrics) {
    loop {
        let mut jobs = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            let Ok(first) = rx.recv() else { return };
            let mut jobs = vec![first];
            // At most one job without a user vector per take, and last: a second one waits for
            // another worker rather than behind this one (they do not batch).
            while jobs.len() < max_batch && !matches!(jobs.last(), Some(Job::Run(_))) {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            jobs
        };
        // Requests that gave up (deadline, cancellation) need no answer.
        jobs.retain(|j| !j.is_closed());
        let mut runs = Vec::new();
        let mut encodes: Vec<Encode> = Vec::with_capacity(jobs.len());
        for job in jobs {
            match job {
                Job::Encode(e) => encodes.push(e),
                Job::Run(r) => runs.push(r),
            }
        }
        // A reload may put jobs of two snapshots in one take: encode each with its own model.
        while !encodes.is_empty() {
            let snap = encodes[0].snap.clone();
            let (same, rest): (Vec<Encode>, Vec<Encode>) = encodes
                .into_iter()
                .partition(|j| Arc::ptr_eq(&j.snap, &snap));
            encodes = rest;
            run_batch(idx, &snap, same, metrics);
        }
        // A search queued behind a batch may have given up while the batch ran.
        for run in runs.into_iter().filter(|r| !r.is_closed()) {
            run.send(Ok(()));
        }
    }
}

fn run_batch(idx: usize, snap: &Snapshot, jobs: Vec<Encode>, metrics: &Metrics) {
    let started = Instant::now();
    let (inputs, replies): (Vec<UserInput>, Vec<VectorReply>) =
        jobs.into_iter().map(|j| (j.input, j.reply)).unzip();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| encode(idx, snap, inputs)))
        .unwrap_or_else(|panic| {
            Err(format!(
                "user tower failed (our bug): {}",
                panic_message(&*panic)
            ))
        });
    metrics.user_tower.observe(started.elapsed().as_secs_f64());
    metrics.encoder_batch.observe(replies.len() as f64);
    match result {
        Ok(vectors) => {
            let mut probes = batch_probes(snap, &vectors, metrics).into_iter();
            for (reply, vector) in replies.into_iter().zip(vectors) {
                let probes = probes.next();
                reply.send(Ok(UserVector { vector, probes }));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "user tower");
            for reply in replies {
                reply.send(Err(e.clone()));
            }
        }
    }
}

/// Each vector's probed lists, from one coarse search over the batch (empty where the index has
/// no inverted file at the top, or the batch is a single user, whose search finds its own). A
/// failure is logged and the searches find their own lists.
fn batch_probes(snap: &Snapshot, vectors: &[Vec<f32>], metrics: &Metrics) -> Vec<Probes> {
    if vectors.len() < 2 {
        return Vec::new();
    }
    let started = Instant::now();
    match snap.index.version.index.probes(&vectors.concat()) {
        Ok(Some(probes)) => {
            metrics.coarse.observe(started.elapsed().as_secs_f64());
            probes
        }
        Ok(None) => Vec::new(),
        Err(e) => {
            tracing::error!(error = %e, "coarse search of a micro-batch");
            Vec::new()
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// One forward pass over `inputs`; the history items' vectors are gathered from the index
/// embeddings (exactly the item tower's outputs) into a small tensor the histories point into.
fn encode(
    idx: usize,
    snap: &Snapshot,
    mut inputs: Vec<UserInput>,
) -> Result<Vec<Vec<f32>>, String> {
    let emb = &snap.index.version.embeddings;
    let dim = emb.dim;
    let mut gathered = GatheredItems::default();
    for u in &mut inputs {
        for EventInput { item_row, .. } in &mut u.history {
            if let Some(row) = item_row {
                *row = gathered.local_row(*row as u32, emb);
            }
        }
    }
    let copies = &snap.model.copies;
    let model = copies[idx % copies.len()]
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let device: Device = snap.model.device;
    let host = UserBatchHost::new(&inputs, &model.config);
    let out = tch::no_grad(|| -> Result<Tensor, tch::TchError> {
        let item_vecs = gathered.to_tensor(dim, device)?;
        let users = model.encode_users(&host.to_device(device), &item_vecs, false);
        users.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)
    })
    .map_err(|e| format!("libtorch: {e}"))?;
    let values = Vec::<f32>::try_from(out.flatten(0, -1)).map_err(|e| format!("libtorch: {e}"))?;
    if values.len() != inputs.len() * dim {
        return Err(format!(
            "user tower returned {} values for {} users of dim {dim}",
            values.len(),
            inputs.len()
        ));
    }
    Ok(values.chunks(dim).map(<[f32]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    fn encoder(workers: usize) -> Encoder {
        Encoder::start(workers, 8, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn a_search_without_a_user_vector_runs_on_a_user_tower_worker() {
        let pool = encoder(2);
        let name = pool
            .handle()
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert!(name.unwrap_or_default().starts_with("user-tower-"));
        pool.close();
    }

    #[tokio::test]
    async fn work_that_panics_on_a_worker_is_an_error_and_the_worker_goes_on() {
        let pool = encoder(1);
        let handle = pool.handle();
        let err = handle.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert!(err.contains("our bug") && err.contains("boom"), "{err}");
        assert_eq!(handle.run(|| 7).await.unwrap(), 7);
        pool.close();
    }

    #[tokio::test]
    async fn work_of_a_request_that_gave_up_is_skipped() {
        let pool = encoder(1);
        let handle = pool.handle();
        // Hold the only worker until the abandoned work is queued behind it.
        let (release, held) = mpsc::channel::<()>();
        let (started, running) = mpsc::channel::<()>();
        let blocker = tokio::spawn({
            let handle = handle.clone();
            async move {
                handle
                    .run(move || {
                        started.send(()).unwrap();
                        held.recv().unwrap()
                    })
                    .await
            }
        });
        tokio::task::spawn_blocking(move || running.recv().unwrap())
            .await
            .unwrap();
        let ran = Arc::new(AtomicBool::new(false));
        let mut abandoned = Box::pin(handle.run({
            let ran = ran.clone();
            move || ran.store(true, Ordering::SeqCst)
        }));
        // One poll queues the work; dropping the future is the request giving up.
        let polled = tokio::time::timeout(Duration::from_millis(1), &mut abandoned).await;
        assert!(
            polled.is_err(),
            "the worker is held, so the work cannot have run"
        );
        drop(abandoned);
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        // Work queued after it has run, so the abandoned work was taken and skipped.
        handle.run(|| ()).await.unwrap();
        assert!(!ran.load(Ordering::SeqCst));
        pool.close();
    }
}
