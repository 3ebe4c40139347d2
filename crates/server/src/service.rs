//! The `twotower.v1.Recommender` handlers. Each one checks its request (`convert`), calls the
//! engine (history store, user tower, retrieval, event log) and maps failures to a status.
//! A shared wrapper applies the deadline and records metrics for every RPC.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use indexer::Probes;
use tonic::{Code, Request, Response, Status};

use crate::admission::Admission;
use crate::admit;
use crate::commit::RecordError;
use crate::config::ServeConfig;
use crate::convert::{self, FilterSpec, RecommendQuery};
use crate::encoder::EncoderHandle;
use crate::gate::{self, Arrival};
use crate::history::HistoryStore;
use crate::metrics::Metrics;
use crate::proto::{self, recommender_server::Recommender};
use crate::recorder::Recorder;
use crate::retrieve::{self, Scored, SearchParams};
use crate::snapshot::Snapshot;
use crate::userinput::{merge_history, user_input};
use crate::userlimit::UserLimit;

/// Everything the handlers share.
pub struct Shared {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub store: Arc<HistoryStore>,
    pub encoder: EncoderHandle,
    pub events: Recorder,
    pub metrics: Arc<Metrics>,
    pub config: ServeConfig,
    /// Admission control: one permit per request in flight, up to a limit that shrinks while
    /// requests wait (`admission.rs`). Without it an overload queues without limit in front of
    /// the user tower and the event log, and every request's latency grows with the queue.
    pub admission: Arc<Admission>,
}

/// The gRPC service.
#[derive(Clone)]
pub struct RecommenderService {
    shared: Arc<Shared>,
}

impl RecommenderService {
    pub fn new(shared: Arc<Shared>) -> Self {
        RecommenderService { shared }
    }

    /// Runs `f` within the request's deadline and records its outcome.
    async fn run<T, R, F, Fut>(
        &self,
        rpc: &'static str,
        req: Request<T>,
        f: F,
    ) -> Result<Response<R>, Status>
    where
        F: FnOnce(Arc<Shared>, T) -> Fut,
        Fut: Future<Output = Result<R, Status>>,
    {
        let arrival = req.extensions().get::<Arrival>().copied();
        let started = arrival.map_or_else(Instant::now, |a| a.0);
        let budget = Duration::from_millis(self.shared.config.request_timeout_ms);
        let deadline = gate::deadline(req.metadata(), arrival, budget);
        // The place, taken once the body has come (`admit.rs` only refuses from the headers
        // while the server is full).
        let admission = &self.shared.admission;
        let permit = admission.try_admit();
        // A call the client cancels is dropped here, mid-await: counted then, as CANCELLED.
        let mut uncounted = Uncounted {
            shared: &self.shared,
            rpc: Some(rpc),
            started,
        };
        let msg = req.into_inner();
        let result = if permit.is_none() {
            Err(admit::refusal(rpc, admission))
        } else if Instant::now() >= deadline {
            Err(deadline_exceeded(rpc))
        } else {
            tokio::time::timeout_at(deadline.into(), f(self.shared.clone(), msg))
                .await
                .unwrap_or_else(|_| Err(deadline_exceeded(rpc)))
        };
        if let Some(permit) = permit {
            permit.finish(started.elapsed());
        }
        let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        uncounted.count(code);
        if let Err(s) = &result {
            if matches!(code, Code::Internal | Code::Unavailable) {
                tracing::warn!(
                    rpc,
                    code = code_name(code),
                    message = s.message(),
                    "request failed"
                );
            }
        }
        result.map(Response::new)
    }
}

/// A request not yet counted in the metrics: counted as CANCELLED if dropped before
/// [`Uncounted::count`], which a cancelled call's handler future is.
struct Uncounted<'a> {
    shared: &'a Shared,
    /// `None` once counted.
    rpc: Option<&'static str>,
    started: Instant,
}

impl Uncounted<'_> {
    fn count(&mut self, code: Code) {
        if let Some(rpc) = self.rpc.take() {
            let s = self.shared;
            admit::count(&s.metrics, &s.admission, rpc, code, self.started.elapsed());
        }
    }
}

impl Drop for Uncounted<'_> {
    fn drop(&mut self) {
        self.count(Code::Cancelled);
    }
}

fn deadline_exceeded(rpc: &str) -> Status {
    Status::deadline_exceeded(format!("{rpc}: the request's deadline passed"))
}

/// The canonical name of a status code (the Prometheus label).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// What a search needs besides the query vector.
struct SearchJob {
    snap: Arc<Snapshot>,
    filter: crate::filter::RowFilter,
    k: usize,
    nprobe: Option<usize>,
    /// The user's item ids, for a model with a second stage: the best `depth` candidates are
    /// retrieved and re-ranked ([`retrieve::rerank`]) before the best `k` are kept.
    history: Option<Vec<u64>>,
    max_overfetch: usize,
    metrics: Arc<crate::metrics::Metrics>,
}

impl SearchJob {
    fn new(
        shared: &Shared,
        snap: Arc<Snapshot>,
        filter: crate::filter::RowFilter,
        k: usize,
        nprobe: Option<usize>,
        history: Option<Vec<u64>>,
    ) -> SearchJob {
        SearchJob {
            snap,
            filter,
            k,
            nprobe,
            history,
            max_overfetch: shared.config.max_overfetch,
            metrics: shared.metrics.clone(),
        }
    }

    /// Retrieval itself: CPU work (FAISS or the exact scan), never on the async runtime.
    /// `probes`: the query's IVF lists, when its micro-batch found them together.
    fn run(self, query: &[f32], probes: Option<&Probes>) -> Result<Vec<Scored>, String> {
        let SearchJob {
            snap,
            filter,
            k,
            nprobe,
            history,
            max_overfetch,
            metrics,
        } = self;
        let reranker = snap.model.reranker.as_ref().filter(|_| history.is_some());
        let params = SearchParams {
            k: reranker.map_or(k, |r| k.max(r.depth)),
            nprobe,
            max_overfetch,
        };
        let started = Instant::now();
        let idx = &snap.index;
        let found = retrieve::top_k(&idx.version, &idx.catalog, query, probes, &filter, params);
        metrics.faiss.observe(started.elapsed().as_secs_f64());
        match (found, &snap.model.reranker, history) {
            (Ok(found), Some(r), Some(history)) => Ok(retrieve::rerank(r, &history, found, k)),
            (found, _, _) => found.map_err(|e| format!("search failed: {e}")),
        }
    }

    /// [`SearchJob::run`] on a user-tower worker, for a request without a user vector: at the
    /// workers' priority, as every admitted request's CPU work.
    async fn on_worker(self, shared: &Shared, query: Vec<f32>) -> Result<Vec<Scored>, Status> {
        shared
            .encoder
            .run(move || self.run(&query, None))
            .await
            .and_then(|found| found)
            .map_err(Status::internal)
    }
}

fn items(snap: &Snapshot, found: &[Scored]) -> Vec<proto::ScoredItem> {
    let catalog = &snap.index.catalog;
    found
        .iter()
        .map(|s| convert::scored_item(catalog, s.row, s.id, s.score))
        .collect()
}

fn check_nprobe(snap: &Snapshot, nprobe: Option<usize>) -> Result<(), Status> {
    if let (Some(n), Some(nlist)) = (nprobe, snap.index.version.index.nlist()) {
        if n > nlist {
            return Err(convert::invalid(
                "nprobe",
                format!("{n} is above the index's {nlist} lists"),
            ));
        }
    }
    Ok(())
}

async fn recommend(
    shared: Arc<Shared>,
    req: proto::RecommendRequest,
) -> Result<proto::RecommendResponse, Status> {
    let q = RecommendQuery::try_from(&req)?;
    let snap = shared.snapshot.load_full();
    check_nprobe(&snap, q.nprobe)?;
    let view = q
        .user_id
        .map(|u| shared.store.view(u, i64::MAX))
        .unwrap_or_default();
    // "Now" is after everything known about the user, so a client's clock running behind ours
    // never hides the events it just sent. An explicit time is taken literally, as in training.
    let ts_ms = if q.explicit_time {
        q.ts_ms
    } else {
        let latest = view
            .events
            .iter()
            .map(|e| e.ts_ms)
            .chain(q.events.iter().map(|e| e.ts_ms));
        latest
            .max()
            .map_or(q.ts_ms, |l| q.ts_ms.max(l.saturating_add(1)))
    };
    let history_len = snap.model.info.tower.history_len;
    let history = merge_history(
        view.events,
        &q.events,
        ts_ms,
        history_len,
        shared.store.ties(),
        shared.store.protocol(),
    );
    let features: Vec<String> = if q.user_features.is_empty() {
        view.features.to_vec()
    } else {
        q.user_features.clone()
    };
    let inline_seen = q.events.iter().filter_map(|e| e.item_id);
    let filter = q
        .filter
        .resolve(&snap.index.catalog, view.seen.clone(), inline_seen)?;
    let response = |items, fallback| proto::RecommendResponse {
        items,
        model_version: snap.model_version().to_string(),
        index_version: snap.index_version().to_string(),
        fallback,
    };
    if history.is_empty() && features.is_empty() {
        // Nothing to personalise on: the most popular items that pass the filter.
        let catalog = &snap.index.catalog;
        let ids = &snap.index.version.embeddings.ids;
        let found: Vec<Scored> = catalog
            .popular()
            .iter()
            .map(|&row| (row, ids[row as usize]))
            .filter(|&(row, id)| filter.passes(id, row, catalog))
            .take(q.k)
            .map(|(row, id)| Scored {
                row,
                id,
                score: catalog.popularity(row),
            })
            .collect();
        return Ok(response(items(&snap, &found), true));
    }
    let input = user_input(&snap, &history, ts_ms, &features);
    // The history's item ids, only for a model whose second stage reads them.
    let history_items = snap.model.reranker.is_some().then(|| {
        history
            .iter()
            .filter_map(|e| e.item_id)
            .collect::<Vec<u64>>()
    });
    // The search runs on the user-tower worker, right after the vector.
    let search = SearchJob::new(&shared, snap.clone(), filter, q.k, q.nprobe, history_items);
    let found = shared
        .encoder
        .encode_then(snap.clone(), input, move |user| {
            search.run(&user.vector, user.probes.as_ref())
        })
        .await
        .and_then(|found| found)
        .map_err(Status::internal)?;
    Ok(response(items(&snap, &found), false))
}

async fn record_events(
    shared: Arc<Shared>,
    req: proto::RecordEventsRequest,
) -> Result<proto::RecordEventsResponse, Status> {
    let latest_ms = convert::now_ms().saturating_add(shared.config.max_clock_skew_ms as i64);
    let batch = convert::record_events(&req, shared.config.max_record_events, latest_ms)?;
    if batch.events.is_empty() {
        return Ok(proto::RecordEventsResponse::default());
    }
    check_user_limit(&shared, &batch.events)?;
    let snap = shared.snapshot.load();
    let unknown = batch
        .events
        .iter()
        .filter(|e| {
            e.item_id
                .is_some_and(|id| !snap.index.version.row_of.contains_key(&id))
        })
        .count();
    shared.metrics.events_unknown_item.inc_by(unknown as u64);
    let recorded = shared
        .events
        .record(batch.events, batch.key)
        .await
        .map_err(|e| match e {
            RecordError::Unavailable(reason) => Status::unavailable(reason),
            reused @ RecordError::KeyReused(_) => Status::already_exists(reused.to_string()),
            RecordError::UserLimit(reason) => Status::resource_exhausted(reason),
        })?;
    Ok(proto::RecordEventsResponse {
        recorded: recorded.events,
        duplicate: recorded.duplicate,
    })
}

/// Refuses a batch that would take the store past `max_users` as it arrives; the event-log
/// writer checks again, counting the batches committed with it (`userlimit.rs`).
fn check_user_limit(shared: &Shared, events: &[features::Event]) -> Result<(), Status> {
    let mut limit = UserLimit::new(&shared.store, shared.config.max_users);
    if limit.has_room_for(events.len()) {
        return Ok(());
    }
    limit.admit(events).map_err(Status::resource_exhausted)
}

async fn similar_items(
    shared: Arc<Shared>,
    req: proto::SimilarItemsRequest,
) -> Result<proto::SimilarItemsResponse, Status> {
    let proto::SimilarItemsRequest { item_id, k, filter } = req;
    let k = convert::k(k)?;
    let snap = shared.snapshot.load_full();
    let version = &snap.index.version;
    let Some(&row) = version.row_of.get(&item_id) else {
        return Err(Status::not_found(format!(
            "item_id: {item_id} is not in index {}",
            version.version
        )));
    };
    let mut filter = FilterSpec::from_proto(filter.as_ref()).resolve(
        &snap.index.catalog,
        Default::default(),
        [],
    )?;
    filter.exclude_ids.insert(item_id);
    let query = version.embeddings.vector(row as usize).to_vec();
    let found = SearchJob::new(&shared, snap.clone(), filter, k, None, None)
        .on_worker(&shared, query)
        .await?;
    Ok(proto::SimilarItemsResponse {
        items: items(&snap, &found),
        index_version: snap.index_version().to_string(),
    })
}

async fn model_info(
    shared: Arc<Shared>,
    req: proto::GetModelInfoRequest,
) -> Result<proto::GetModelInfoResponse, Status> {
    let proto::GetModelInfoRequest {} = req;
    let snap = shared.snapshot.load_full();
    let v = &snap.index.version;
    let m = &v.manifest;
    Ok(proto::GetModelInfoResponse {
        model_version: snap.model_version().to_string(),
        index_version: snap.index_version().to_string(),
        item_count: v.embeddings.len() as u64,
        dim: v.embeddings.dim as u32,
        nprobe: v.index.default_nprobe().or(m.nprobe).unwrap_or(0) as u32,
        recall_at_10_vs_exact: m.recall_at_10_vs_exact,
        recall_at_100_vs_exact: m.recall_at_100_vs_exact,
        user_count: shared.store.user_count() as u64,
    })
}

#[tonic::async_trait]
impl Recommender for RecommenderService {
    async fn recommend(
        &self,
        request: Request<proto::RecommendRequest>,
    ) -> Result<Response<proto::RecommendResponse>, Status> {
        self.run("Recommend", request, recommend).await
    }

    async fn record_events(
        &self,
        request: Request<proto::RecordEventsRequest>,
    ) -> Result<Response<proto::RecordEventsResponse>, Status> {
        self.run("RecordEvents", request, record_events).await
    }

    async fn similar_items(
        &self,
        request: Request<proto::SimilarItemsRequest>,
    ) -> Result<Response<proto::SimilarItemsResponse>, Status> {
        self.run("SimilarItems", request, similar_items).await
    }

    async fn get_model_info(
        &self,
        request: Request<proto::GetModelInfoRequest>,
    ) -> Result<Response<proto::GetModelInfoResponse>, Status> {
        self.run("GetModelInfo", request, model_info).await
    }
}
