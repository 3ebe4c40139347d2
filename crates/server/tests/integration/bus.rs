//! Replicas on one event bus (a real NATS JetStream server): events recorded on one replica are
//! served by every other, a retry sent to another replica is recorded once, a replica started
//! later replays the stream, and an unreachable bus fails start-up with its address.

use std::time::{Duration, Instant};

use server::proto::{RecommendRequest, RecordEventsRequest};

use crate::fixture::{Events, Nats, TestServer};
use crate::state::{http_get, metric};

fn record(user: u64, items: &[u64], key: &str) -> RecordEventsRequest {
    RecordEventsRequest {
        idempotency_key: key.to_string(),
        ..crate::state::record(user, items, 1_700_000_000_000)
    }
}

async fn top(s: &TestServer, user: u64) -> Vec<u64> {
    let mut c = s.client.clone();
    c.recommend(RecommendRequest {
        user_id: Some(user),
        k: 10,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .items
    .iter()
    .map(|i| i.item_id)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_recorded_on_one_replica_is_excluded_by_the_other() {
    let events = Events::bus();
    let a = events.start().await;
    let b = events.start().await;
    let user = 77_000_001;
    let before = top(&b, user).await;
    let seen = before[0];
    let mut ca = a.client.clone();
    let r = ca
        .record_events(record(user, &[seen], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.recorded, r.duplicate), (1, false));
    // The recording replica serves it at once; the other within moments.
    assert!(!top(&a, user).await.contains(&seen));
    let deadline = Instant::now() + Duration::from_secs(10);
    while top(&b, user).await.contains(&seen) {
        assert!(Instant::now() < deadline, "replica b never saw the event");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let applied = |s: &TestServer| {
        metric(
            &http_get(s.running.metrics_addr.unwrap(), "/metrics"),
            "twotower_bus_events_applied_total",
        )
    };
    assert_eq!((applied(&a), applied(&b)), (1, 1));
    a.running.stop().await.unwrap();
    b.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_sent_to_another_replica_is_recorded_once() {
    let events = Events::bus();
    let a = events.start().await;
    let b = events.start().await;
    // The same keyed batch through both replicas at once, as a client retrying through a
    // balancer would; and an unkeyed batch sent twice (its id is derived from its contents).
    let mut tasks = Vec::new();
    for s in [&a, &b, &a, &b] {
        let mut c = s.client.clone();
        tasks.push(tokio::spawn(async move {
            c.record_events(record(77_000_002, &[5, 6], "retry-1"))
                .await
                .unwrap()
                .into_inner()
        }));
    }
    let mut firsts = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.recorded, 2);
        firsts += !r.duplicate as usize;
    }
    assert_eq!(firsts, 1, "one attempt recorded the batch");
    let mut ca = a.client.clone();
    let mut cb = b.client.clone();
    let once = ca
        .record_events(record(77_000_003, &[7], ""))
        .await
        .unwrap()
        .into_inner();
    let twice = cb
        .record_events(record(77_000_003, &[7], ""))
        .await
        .unwrap()
        .into_inner();
    assert!(!once.duplicate && twice.duplicate, "{once:?} {twice:?}");
    a.running.stop().await.unwrap();
    b.running.stop().await.unwrap();

    // A replica started now replays exactly the three events.
    let c = events.start().await;
    let m = http_get(c.running.metrics_addr.unwrap(), "/metrics");
    assert_eq!(metric(&m, "twotower_events_replayed"), 3);
    assert!(!top(&c, 77_000_003).await.contains(&7));
    c.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bus_fails_start_up_naming_it() {
    // A port nothing listens on (a NATS server started and stopped).
    let url = {
        let nats = Nats::start();
        nats.url.clone()
    };
    let state = tempfile::tempdir().unwrap();
    let mut opts = crate::fixture::options(state.path());
    let mut bus = server::BusSettings::new(&url, "TEST");
    bus.connect_timeout = Duration::from_secs(1);
    opts.events = server::EventStore::Bus(bus);
    let err = match server::start(opts).await {
        Ok(_) => panic!("started without its event bus"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&url) && err.contains("connect"), "{err}");
}
