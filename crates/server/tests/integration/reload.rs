//! Hot reload under a stream of requests: a new version is picked up with zero failed requests,
//! and a bad version is rejected while the old one keeps serving.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use server::proto::{GetModelInfoRequest, RecommendRequest};

use crate::fixture::{build_into, fixture, options, shared_index, start_with, view};

/// Copies an index root, leaving out the leases of servers running on the original.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() == ".leases" {
            continue;
        }
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_during_requests_fails_none_and_a_bad_version_is_rejected() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    let root = state.path().join("index");
    copy_dir(shared_index(), &root);
    let mut opts = options(state.path());
    opts.index_root = root.clone();
    let mut s = start_with(opts, state).await;
    let first = s
        .client
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let user = f.active_user();
    let item = *f.items.keys().next().unwrap();
    let mut clients = Vec::new();
    for t in 0..3u64 {
        let (mut c, stop, ok, failed) =
            (s.client.clone(), stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut versions = std::collections::HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                let req = RecommendRequest {
                    user_id: (t != 1).then_some(user + t),
                    events: if t == 1 {
                        vec![view(item, 1_700_000_000_000)]
                    } else {
                        vec![]
                    },
                    k: 10,
                    ..Default::default()
                };
                match c.recommend(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        versions.insert(r.index_version);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("request failed during reload: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            versions
        }));
    }

    // A new good version (same model, rebuilt index).
    let r = root.clone();
    let manifest = tokio::task::spawn_blocking(move || build_into(&r))
        .await
        .unwrap();
    assert_ne!(manifest.version, first.index_version);
    let served = wait_for_version(&mut s.client, &manifest.version).await;
    assert!(served, "the new version was not picked up");

    // A bad version: the manifest claims other weights. It must be rejected.
    let bad = "20991231T235959Z-deadbeef";
    publish_bad_copy(&root, &manifest.version, bad);
    // Polled every 100 ms, the rejected version is loaded once, not at every poll.
    tokio::time::sleep(Duration::from_millis(800)).await;
    // A CURRENT naming garbage is ignored the same way.
    std::fs::write(root.join("CURRENT"), "not a version\n").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;

    stop.store(true, Ordering::Relaxed);
    let mut versions = std::collections::HashSet::new();
    for c in clients {
        versions.extend(c.await.unwrap());
    }
    let info = s
        .client
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.index_version, manifest.version,
        "the bad version must not be served"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests during reload"
    );
    assert!(ok.load(Ordering::Relaxed) > 10);
    assert!(versions.contains(&manifest.version), "{versions:?}");
    assert!(!versions.contains(bad));
    let metrics = crate::state::http_get(s.running.metrics_addr.unwrap(), "/metrics");
    assert!(
        metrics.contains(r#"twotower_reloads_total{result="ok"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"twotower_reloads_total{result="rejected"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("twotower_current_unreadable_total 0"),
        "a garbled CURRENT is counted: {metrics}"
    );
    s.running.stop().await.unwrap();
}

/// Copies version `from` to `bad` with a manifest claiming other weights (it cannot be paired
/// with the model), and points `CURRENT` at it.
fn publish_bad_copy(root: &Path, from: &str, bad: &str) {
    copy_dir(&root.join(from), &root.join(bad));
    let mpath = root.join(bad).join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["version"] = bad.into();
    m["model"]["weights_sha256"] = "0".repeat(64).into();
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    std::fs::write(root.join("CURRENT"), format!("{bad}\n")).unwrap();
}

/// A state directory holding a copy of the shared index, its root, and the version it serves.
fn copied_index() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let state = tempfile::tempdir().unwrap();
    let root = state.path().join("index");
    copy_dir(shared_index(), &root);
    let current = std::fs::read_to_string(root.join("CURRENT")).unwrap();
    let good = current.trim().to_string();
    (state, root, good)
}

/// Files copied out of order (a replica sync that writes `CURRENT` before the version's files):
/// the version is rejected, then served once its files are whole, without a new publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_version_is_tried_again_and_served_once_its_files_are_whole() {
    let (state, root, good) = copied_index();
    let mut opts = options(state.path());
    opts.index_root = root.clone();
    let mut s = start_with(opts, state).await;
    let late = "20991231T235959Z-1a7e1a7e";
    publish_bad_copy(&root, &good, late);
    // Rejected (the manifest does not match the model yet) ...
    let addr = s.running.metrics_addr.unwrap();
    let rejected = || {
        crate::state::http_get(addr, "/metrics")
            .contains(r#"twotower_reloads_total{result="rejected"} 1"#)
    };
    let start = Instant::now();
    while !rejected() && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rejected(), "the incomplete version was never rejected");
    // ... until the rest of its files arrive: 30 polls later it is tried again.
    let good_manifest = std::fs::read(root.join(&good).join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&good_manifest).unwrap();
    m["version"] = late.into();
    std::fs::write(
        root.join(late).join("manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    assert!(
        wait_for_version(&mut s.client, late).await,
        "never tried again"
    );
    s.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_current_at_start_up_falls_back_to_the_newest_valid_version_unless_strict() {
    let (state, root, good) = copied_index();
    let bad = "20991231T235959Z-deadbeef";
    publish_bad_copy(&root, &good, bad);
    let mut opts = options(state.path());
    opts.index_root = root.clone();

    opts.strict = true;
    let err = match server::start(opts.clone()).await {
        Ok(_) => panic!("--strict must refuse a broken CURRENT"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(bad), "{err}");

    opts.strict = false;
    let mut s = start_with(opts, state).await;
    let info = s
        .client
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.index_version, good);
    let metrics = crate::state::http_get(s.running.metrics_addr.unwrap(), "/metrics");
    assert!(
        metrics.contains("twotower_serving_fallback_version 1"),
        "{metrics}"
    );
    // The server holds a lease on the version it fell back to, so GC keeps it.
    let start = Instant::now();
    let leased = loop {
        let leased = indexer::IndexRoot::new(&root).leased_versions().unwrap();
        if leased.contains(&good) || start.elapsed() > Duration::from_secs(10) {
            break leased;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(leased.contains(&good), "{leased:?}");
    s.running.stop().await.unwrap();
    let leased = indexer::IndexRoot::new(&root).leased_versions().unwrap();
    assert!(
        leased.is_empty(),
        "a stopped server gives its lease up: {leased:?}"
    );
}

async fn wait_for_version(
    c: &mut server::proto::recommender_client::RecommenderClient<tonic::transport::Channel>,
    version: &str,
) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let info = c
            .get_model_info(GetModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        if info.index_version == version {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
