//! The admission check in front of the `Recommender` service, made from a request's headers.
//!
//! Under overload most requests are refused, and what a refusal costs decides how much CPU is
//! left for the admitted ones: at 3x capacity on one core, taking in and refusing the excess took
//! about 40% of it (`docs/benchmarks.md`, session 18). Refused here, below the token check and
//! above tonic's codec, a request is answered with a trailers-only `RESOURCE_EXHAUSTED` before its
//! body is read or decoded and before any handler runs (measured, this did not raise admitted
//! throughput visibly: most of a refusal's cost is HTTP/2 and loopback TCP, session 19).
//! The check takes no place: the handler takes it once the body has come and decoded, and reports
//! its time in the server when it finishes. A place taken from the headers on would be held by a
//! stream whose body never comes, and one connection sending 64 such streams every few seconds
//! kept every other client out (a hostile-client audit, session 21). Between the check and the
//! handler another request may take the last place; the handler then refuses, after the decode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{self, Either, Ready};
use tonic::codegen::{http, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::admission::Admission;
use crate::gate::Arrival;
use crate::metrics::Metrics;
use crate::service::code_name;

/// Wraps the `Recommender` service: each call to one of its methods is refused from its headers
/// alone while the server is at its admission limit.
#[derive(Clone)]
pub struct Admit<S> {
    inner: S,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
}

impl<S> Admit<S> {
    pub fn new(inner: S, admission: Arc<Admission>, metrics: Arc<Metrics>) -> Admit<S> {
        Admit {
            inner,
            admission,
            metrics,
        }
    }
}

impl<S: NamedService> NamedService for Admit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for Admit<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Paths outside the service's methods are left to tonic (UNIMPLEMENTED), and never
        // become a metrics label.
        let Some(rpc) = rpc_of(req.uri().path()) else {
            return Either::Left(self.inner.call(req));
        };
        match self.admission.has_room() {
            true => Either::Left(self.inner.call(req)),
            false => {
                let arrived = req.extensions().get::<Arrival>().map(|a| a.0);
                let in_server = arrived.unwrap_or_else(Instant::now).elapsed();
                count(
                    &self.metrics,
                    &self.admission,
                    rpc,
                    Code::ResourceExhausted,
                    in_server,
                );
                Either::Right(future::ready(Ok(refusal(rpc, &self.admission).into_http())))
            }
        }
    }
}

/// The service's methods, the names its handlers count under (a test holds this to the proto).
const METHODS: [&str; 4] = ["Recommend", "RecordEvents", "SimilarItems", "GetModelInfo"];

/// The method a request path names (`/twotower.v1.Recommender/Recommend` → `Recommend`), among the
/// service's own.
fn rpc_of(path: &str) -> Option<&'static str> {
    let method = path.rsplit('/').next()?;
    METHODS.into_iter().find(|&m| m == method)
}

/// Counts one answered request by method and status, with its time in the server, and
/// publishes the admission limit and target it was answered under.
pub(crate) fn count(
    metrics: &Metrics,
    admission: &Admission,
    rpc: &str,
    code: Code,
    in_server: Duration,
) {
    metrics.admission_limit.set(admission.limit() as i64);
    metrics
        .admission_target
        .set(admission.target().map_or(0.0, |t| t.as_secs_f64()));
    metrics
        .requests
        .with_label_values(&[rpc, code_name(code)])
        .inc();
    metrics
        .latency
        .with_label_values(&[rpc])
        .observe(in_server.as_secs_f64());
}

/// The status of a refused request: which limit it met, and what the caller can do.
pub(crate) fn refusal(rpc: &str, admission: &Admission) -> Status {
    let (limit, max) = (admission.limit(), admission.max());
    let lowered = if limit < max {
        format!(", lowered from {max} while requests wait over admission_target_ms")
    } else {
        String::new()
    };
    Status::resource_exhausted(format!(
        "{rpc}: the server is at its limit of {limit} requests in flight (max_in_flight{lowered}); retry with backoff or add replicas"
    ))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::admission::Target;

    /// Stands where tonic's codec and handlers are: counts the requests that reach it, and keeps
    /// them, as a stream whose body has not come yet is kept.
    #[derive(Clone, Default)]
    struct Behind(Arc<AtomicUsize>, Arc<Mutex<Vec<http::Request<()>>>>);

    impl Service<http::Request<()>> for Behind {
        type Response = http::Response<()>;
        type Error = Infallible;
        type Future = Ready<Result<http::Response<()>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.lock().unwrap().push(req);
            future::ready(Ok(http::Response::new(())))
        }
    }

    fn call(svc: &mut Admit<Behind>, path: &str) -> http::Response<()> {
        let req = http::Request::builder().uri(path).body(()).unwrap();
        match svc.call(req) {
            Either::Left(f) | Either::Right(f) => f.into_inner().unwrap(),
        }
    }

    #[test]
    fn every_method_of_the_proto_service_is_admitted_here() {
        use prost::Message;
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let service = set
            .file
            .iter()
            .flat_map(|f| &f.service)
            .find(|s| s.name() == "Recommender")
            .unwrap();
        let mut methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
        let mut ours = METHODS.to_vec();
        methods.sort_unstable();
        ours.sort_unstable();
        assert_eq!(methods, ours);
    }

    #[test]
    fn a_refused_request_never_reaches_the_codec_and_names_its_method() {
        let admission = Admission::new(1, 1, Target::Off);
        let metrics = Arc::new(Metrics::new());
        let behind = Behind::default();
        let mut svc = Admit::new(behind.clone(), Arc::clone(&admission), metrics.clone());
        let held = admission.try_admit().unwrap();

        let refused = call(&mut svc, "/twotower.v1.Recommender/Recommend");
        let status = Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().starts_with("Recommend: "), "{status:?}");
        assert_eq!(behind.0.load(Ordering::SeqCst), 0);
        let counted = metrics
            .requests
            .with_label_values(&["Recommend", "RESOURCE_EXHAUSTED"])
            .get();
        assert_eq!(counted, 1);

        // Another service's path is not this limit's business (and never a metrics label).
        call(&mut svc, "/grpc.health.v1.Health/Check");
        assert_eq!(behind.0.load(Ordering::SeqCst), 1);

        drop(held);
        call(&mut svc, "/twotower.v1.Recommender/RecordEvents");
        assert_eq!(behind.0.load(Ordering::SeqCst), 2);
        assert!(admission.try_admit().is_some(), "the place was freed");
    }

    #[test]
    fn streams_whose_bodies_never_come_hold_no_place() {
        let admission = Admission::new(2, 1, Target::Off);
        let behind = Behind::default();
        let mut svc = Admit::new(behind.clone(), admission.clone(), Arc::new(Metrics::new()));
        for _ in 0..64 {
            let passed = call(&mut svc, "/twotower.v1.Recommender/Recommend");
            assert!(Status::from_header_map(passed.headers()).is_none());
        }
        assert_eq!(
            behind.1.lock().unwrap().len(),
            64,
            "all still waiting for a body"
        );
        // A request whose body has come takes its place in the handler, as before.
        let (a, b) = (admission.try_admit(), admission.try_admit());
        assert!(a.is_some() && b.is_some());
        let refused = call(&mut svc, "/twotower.v1.Recommender/GetModelInfo");
        let status = Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
    }
}
