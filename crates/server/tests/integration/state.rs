//! RecordEvents: the next Recommend reflects it, it survives a restart (and a torn log tail),
//! concurrent requests are group-committed; and the metrics endpoint reports it all.

use std::io::{Read, Write};

use server::proto::{RecommendRequest, RecordEventsRequest, UserEvents};

use crate::fixture::{fixture, options, start_with, view, Events};

/// A request recording views of `items` by `user`, one millisecond apart from `ts`.
pub fn record(user: u64, items: &[u64], ts: i64) -> RecordEventsRequest {
    RecordEventsRequest {
        users: vec![UserEvents {
            user_id: user,
            events: items
                .iter()
                .enumerate()
                .map(|(i, &id)| view(id, ts + i as i64))
                .collect(),
        }],
        idempotency_key: String::new(),
    }
}

fn rec(user: u64, k: u32) -> RecommendRequest {
    RecommendRequest {
        user_id: Some(user),
        k,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_events_change_the_next_result_and_survive_a_restart_on_the_log() {
    recorded_events_change_the_next_result_and_survive_a_restart(Events::Log).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_events_change_the_next_result_and_survive_a_restart_on_the_bus() {
    recorded_events_change_the_next_result_and_survive_a_restart(Events::bus()).await
}

async fn recorded_events_change_the_next_result_and_survive_a_restart(events: Events) {
    let f = fixture();
    let mut s = events.start().await;
    let user = 55_555_555u64;
    let before = s
        .client
        .recommend(rec(user, 10))
        .await
        .unwrap()
        .into_inner();
    assert!(before.fallback, "a user with no history");
    // The top fallback items become seen: they must disappear from the next answer.
    let items: Vec<u64> = before.items.iter().take(3).map(|i| i.item_id).collect();
    let n = s
        .client
        .record_events(record(user, &items, 1_700_000_000_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.recorded, 3);
    // An explicit request time keeps the answer independent of the wall clock.
    let at = |k| RecommendRequest {
        context: Some(server::proto::Context {
            ts_ms: 1_700_000_100_000,
            user_features: vec![],
        }),
        ..rec(user, k)
    };
    let after = s.client.recommend(at(10)).await.unwrap().into_inner();
    assert!(!after.fallback, "recorded history is used at once");
    assert!(after.items.iter().all(|i| !items.contains(&i.item_id)));
    assert_ne!(before.items, after.items);

    // An existing user's result changes too.
    let active = f.active_user();
    let r1 = s
        .client
        .recommend(rec(active, 10))
        .await
        .unwrap()
        .into_inner();
    let new: Vec<u64> = r1.items.iter().take(4).map(|i| i.item_id).collect();
    s.client
        .record_events(record(active, &new, server::convert::now_ms()))
        .await
        .unwrap();
    let r2 = s
        .client
        .recommend(rec(active, 10))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(r1.items, r2.items);
    assert!(r2.items.iter().all(|i| !new.contains(&i.item_id)));

    s.running.stop().await.unwrap();
    if let Events::Log = events {
        // A crash while appending leaves a torn record; start-up truncates it and keeps the rest.
        let log = s.state.path().join("events.log");
        let mut torn = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        torn.write_all(&[40, 0, 0, 0, 1, 2, 3]).unwrap();
    }
    let mut s = events.restart(s.state).await;
    let again = s.client.recommend(at(10)).await.unwrap().into_inner();
    assert!(!again.fallback);
    assert_eq!(
        again.items, after.items,
        "same history after restart, same answer"
    );
    let r3 = s
        .client
        .recommend(rec(active, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r3.items, r2.items);
    s.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_are_all_durable_and_metrics_report_them_on_the_log() {
    concurrent_records_are_all_durable_and_metrics_report_them(Events::Log).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_are_all_durable_and_metrics_report_them_on_the_bus() {
    concurrent_records_are_all_durable_and_metrics_report_them(Events::bus()).await
}

async fn concurrent_records_are_all_durable_and_metrics_report_them(events: Events) {
    let s = events.start().await;
    let before = http_get(s.running.metrics_addr.unwrap(), "/metrics");
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let mut c = s.client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10u64 {
                let n = c
                    .record_events(record(
                        1_000_000 + t,
                        &[1 + i, 2 + i],
                        1_700_000_000_000 + i as i64 * 10,
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .recorded;
                assert_eq!(n, 2);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = s.client.clone();
    c.recommend(rec(1_000_000, 5)).await.unwrap();
    let metrics = http_get(s.running.metrics_addr.unwrap(), "/metrics");
    assert!(
        metrics.contains("twotower_events_recorded_total 160"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"twotower_requests_total{code="OK",rpc="RecordEvents"} 80"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("twotower_index_version{index_version="),
        "{metrics}"
    );
    assert!(
        metrics.contains("twotower_user_tower_seconds_count"),
        "{metrics}"
    );
    assert!(
        metrics.contains("twotower_faiss_seconds_count"),
        "{metrics}"
    );
    assert!(
        metrics.contains("twotower_request_seconds_bucket"),
        "{metrics}"
    );
    // 8 new users, each with items 1..=11 seen (the two items of 10 batches overlap).
    let grew = |name| metric(&metrics, name) - metric(&before, name);
    assert_eq!(grew("twotower_users"), 8, "{metrics}");
    assert_eq!(grew("twotower_seen_items"), 88, "{metrics}");
    s.running.stop().await.unwrap();
    // Every acknowledged event is replayed by the next start.
    assert_eq!(replayed_on_restart(&events, s.state).await, 160);
}

/// A minimal HTTP/1.1 GET.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_record_events_batch_is_recorded_once_even_after_a_restart_on_the_log() {
    a_retried_record_events_batch_is_recorded_once_even_after_a_restart(Events::Log).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_record_events_batch_is_recorded_once_even_after_a_restart_on_the_bus() {
    a_retried_record_events_batch_is_recorded_once_even_after_a_restart(Events::bus()).await
}

async fn a_retried_record_events_batch_is_recorded_once_even_after_a_restart(events: Events) {
    let s = events.start().await;
    let keyed = |key: &str, items: &[u64]| RecordEventsRequest {
        idempotency_key: key.to_string(),
        ..record(2_000_000, items, 1_700_000_000_000)
    };
    // A client that timed out retries, also concurrently with its first attempt.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = s.client.clone();
        let req = keyed("order-1", &[11, 12, 13]);
        tasks.push(tokio::spawn(async move {
            c.record_events(req).await.unwrap().into_inner()
        }));
    }
    let mut duplicates = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.recorded, 3, "every attempt reports the first one's count");
        duplicates += r.duplicate as usize;
    }
    assert_eq!(duplicates, 3, "exactly one attempt recorded the batch");
    let mut c = s.client.clone();
    let other = c
        .record_events(keyed("order-2", &[14]))
        .await
        .unwrap()
        .into_inner();
    assert!(!other.duplicate);
    let metrics = http_get(s.running.metrics_addr.unwrap(), "/metrics");
    assert!(
        metrics.contains("twotower_events_recorded_total 4"),
        "{metrics}"
    );
    let state = s.state;
    s.running.stop().await.unwrap();

    // The window is rebuilt from the log or stream: a retry after a restart is still a repeat.
    let mut s = events.restart(state).await;
    let again = s
        .client
        .record_events(keyed("order-1", &[11, 12, 13]))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate && again.recorded == 3, "{again:?}");
    let long = s
        .client
        .record_events(keyed(&"x".repeat(129), &[1]))
        .await
        .unwrap_err();
    assert_eq!(long.code(), tonic::Code::InvalidArgument);
    assert!(
        long.message().starts_with("idempotency_key"),
        "{}",
        long.message()
    );
    s.running.stop().await.unwrap();
    assert_eq!(replayed_on_restart(&events, s.state).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_events_for_users_beyond_max_users_are_refused_and_unknown_items_counted() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    let mut opts = options(state.path());
    // The fixture's data already holds more users than this.
    opts.config.max_users = 2;
    let mut s = start_with(opts, state).await;
    let known = *f.items.keys().next().unwrap();
    let unknown = u64::MAX - 5;
    assert!(!f.items.contains_key(&unknown));
    // Users already held keep recording; unknown item ids are accepted and counted.
    let r = s
        .client
        .record_events(record(
            f.active_user(),
            &[known, unknown],
            1_700_000_000_000,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.recorded, 2);
    let err = s
        .client
        .record_events(record(987_654_321, &[known], 1_700_000_000_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.message().contains("max_users"), "{}", err.message());
    let metrics = http_get(s.running.metrics_addr.unwrap(), "/metrics");
    assert!(
        metrics.contains("twotower_events_unknown_item_total 1"),
        "{metrics}"
    );
    s.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_of_new_users_cannot_take_the_store_past_max_users() {
    let f = fixture();
    let users_held = |s: &crate::fixture::TestServer| {
        metric(
            &http_get(s.running.metrics_addr.unwrap(), "/metrics"),
            "twotower_users",
        )
    };
    let held = {
        let state = tempfile::tempdir().unwrap();
        let s = start_with(options(state.path()), state).await;
        let held = users_held(&s);
        s.running.stop().await.unwrap();
        held
    };
    let state = tempfile::tempdir().unwrap();
    let mut opts = options(state.path());
    opts.config.max_users = held as usize + 10;
    let s = start_with(opts, state).await;
    let known = *f.items.keys().next().unwrap();
    // 40 batches at once, each with two new users: room for five of them. Checked only as they
    // arrived, against the same count, they all fitted.
    let calls = (0..40u64).map(|i| {
        let mut client = s.client.clone();
        let mut req = record(1_000_000_000 + 2 * i, &[known], 1_700_000_000_000);
        req.users
            .extend(record(1_000_000_001 + 2 * i, &[known], 1_700_000_000_000).users);
        async move { client.record_events(req).await }
    });
    let results = futures_util::future::join_all(calls).await;
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("max_users"), "{}", err.message());
    }
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 5);
    assert_eq!(users_held(&s), held + 10);
    s.running.stop().await.unwrap();
}

/// Events a restarted server replays (from its event log or the stream), as its metrics say.
async fn replayed_on_restart(events: &Events, state: tempfile::TempDir) -> u64 {
    let s = events.restart(state).await;
    let metrics = http_get(s.running.metrics_addr.unwrap(), "/metrics");
    s.running.stop().await.unwrap();
    metric(&metrics, "twotower_events_replayed")
}

/// The value of an unlabelled metric.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}
