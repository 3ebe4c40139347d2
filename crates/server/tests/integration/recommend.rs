//! Recommend, SimilarItems and GetModelInfo answers, and the exactness of filters.

use std::collections::HashSet;

use server::proto::{Filter, GetModelInfoRequest, RecommendRequest, SimilarItemsRequest};

use crate::fixture::{fixture, start, view};

fn sorted_by_score(items: &[server::proto::ScoredItem]) -> bool {
    items.windows(2).all(|w| w[0].score >= w[1].score)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommend_by_user_is_personal_unseen_and_carries_versions_and_content() {
    let f = fixture();
    let mut s = start().await;
    let user = f.active_user();
    let info = s
        .client
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let r = s
        .client
        .recommend(RecommendRequest {
            user_id: Some(user),
            k: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.fallback);
    assert_eq!(r.items.len(), 10);
    assert_eq!(
        (&r.model_version, &r.index_version),
        (&info.model_version, &info.index_version)
    );
    assert!(sorted_by_score(&r.items), "{:?}", r.items);
    let seen = f.seen(user);
    for it in &r.items {
        assert!(
            !seen.contains(&it.item_id),
            "seen item {} returned",
            it.item_id
        );
        let item = &f.items[&it.item_id];
        assert_eq!((&it.title, &it.categories), (&item.title, &item.categories));
    }
    let ids: HashSet<u64> = r.items.iter().map(|i| i.item_id).collect();
    assert_eq!(ids.len(), 10, "duplicates");
    // exclude_seen = false may return seen items, and still k of them.
    let all = s
        .client
        .recommend(RecommendRequest {
            user_id: Some(user),
            k: 10,
            filter: Some(Filter {
                exclude_seen: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.items.len(), 10);
    s.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_events_alone_personalise_and_a_new_user_gets_popular_items() {
    let f = fixture();
    let mut s = start().await;
    let items: Vec<u64> = f.items.keys().copied().take(3).collect();
    let r = s
        .client
        .recommend(RecommendRequest {
            events: items
                .iter()
                .enumerate()
                .map(|(i, &id)| view(id, 1_700_000_000_000 + i as i64))
                .collect(),
            k: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.fallback);
    assert_eq!(r.items.len(), 5);
    assert!(
        r.items.iter().all(|i| !items.contains(&i.item_id)),
        "inline items are seen"
    );

    let new = s
        .client
        .recommend(RecommendRequest {
            user_id: Some(987_654_321),
            k: 7,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(new.fallback);
    let counts = f.counts();
    let mut popular: Vec<(u64, u64)> = f
        .items
        .keys()
        .map(|&id| (counts.get(&id).copied().unwrap_or(0), id))
        .collect();
    popular.sort_by_key(|&(c, id)| (std::cmp::Reverse(c), id));
    let expected: Vec<u64> = popular.iter().take(7).map(|&(_, id)| id).collect();
    let got: Vec<u64> = new.items.iter().map(|i| i.item_id).collect();
    assert_eq!(got, expected);
    // Context features alone are enough to personalise.
    let ctx = s
        .client
        .recommend(RecommendRequest {
            k: 3,
            context: Some(server::proto::Context {
                ts_ms: 1_700_000_000_000,
                user_features: vec!["segment:x".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ctx.fallback);
    assert_eq!(ctx.items.len(), 3);
    s.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_and_id_filters_hold_exactly_and_never_return_fewer_than_pass() {
    let f = fixture();
    let mut s = start().await;
    let user = f.active_user();
    let seen = f.seen(user);
    // The most common category, and a second one to exclude.
    let mut freq: std::collections::HashMap<&str, usize> = Default::default();
    for it in f.items.values() {
        for c in &it.categories {
            *freq.entry(c.as_str()).or_default() += 1;
        }
    }
    let mut cats: Vec<(&str, usize)> = freq.into_iter().collect();
    cats.sort_by_key(|&(c, n)| (std::cmp::Reverse(n), c));
    let include = cats[0].0.to_string();
    let exclude = cats
        .iter()
        .map(|c| c.0)
        .find(|c| {
            f.items
                .values()
                .any(|i| i.categories.contains(&include) && i.categories.iter().any(|x| x == c))
                && *c != include
        })
        .unwrap()
        .to_string();
    let excluded_ids: Vec<u64> = f
        .items
        .keys()
        .copied()
        .filter(|id| !seen.contains(id))
        .take(5)
        .collect();
    let passes = |id: u64| {
        let cats = &f.items[&id].categories;
        !seen.contains(&id)
            && !excluded_ids.contains(&id)
            && cats.contains(&include)
            && !cats.contains(&exclude)
    };
    let total = f.items.keys().filter(|&&id| passes(id)).count();
    assert!(total > 10, "fixture too small: {total}");
    for k in [5u32, 1000] {
        let r = s
            .client
            .recommend(RecommendRequest {
                user_id: Some(user),
                k,
                // Case-insensitive category names.
                filter: Some(Filter {
                    include_categories: vec![include.to_uppercase()],
                    exclude_categories: vec![exclude.clone()],
                    exclude_item_ids: excluded_ids.clone(),
                    exclude_seen: None,
                }),
                nprobe: Some(1),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.items.iter().all(|i| passes(i.item_id)), "{:?}", r.items);
        assert_eq!(r.items.len(), (k as usize).min(total), "k={k}");
        assert!(sorted_by_score(&r.items));
    }
    s.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similar_items_and_model_info() {
    let f = fixture();
    let mut s = start().await;
    let item = *f.items.keys().min().unwrap();
    let r = s
        .client
        .similar_items(SimilarItemsRequest {
            item_id: item,
            k: 8,
            filter: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.items.len(), 8);
    assert!(r.items.iter().all(|i| i.item_id != item));
    assert!(sorted_by_score(&r.items));
    let info = s
        .client
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let m = indexer::Manifest::load(
        &crate::fixture::shared_index()
            .join(&info.index_version)
            .join("manifest.json"),
    )
    .unwrap();
    assert_eq!(info.item_count, m.count as u64);
    assert_eq!(info.dim, 16);
    assert_eq!(info.recall_at_10_vs_exact, m.recall_at_10_vs_exact);
    assert_eq!(info.nprobe as usize, m.nprobe.unwrap_or(0));
    assert!(info.user_count >= 80);
    assert_eq!(r.index_version, info.index_version);
    s.running.stop().await.unwrap();
}

/// The index search runs on the user-tower worker, one closure per request of a micro-batch, on
/// the inverted lists the batch found for all its users at once: requests encoded together must
/// each get the answer they get alone, never a neighbour's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_encoded_in_one_batch_each_get_their_own_search() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    let mut opts = crate::fixture::options(state.path());
    opts.config.encoder_workers = 1;
    let mut s = crate::fixture::start_with(opts, state).await;
    let mut users: Vec<u64> = f.events.iter().map(|e| e.user_id).collect();
    users.sort_unstable();
    users.dedup();
    users.truncate(48);
    let request = |user| RecommendRequest {
        user_id: Some(user),
        k: 10,
        ..Default::default()
    };
    let mut alone = Vec::new();
    for &u in &users {
        alone.push(s.client.recommend(request(u)).await.unwrap().into_inner());
    }
    let together = futures_util::future::join_all(users.iter().map(|&u| {
        let mut c = s.client.clone();
        async move { c.recommend(request(u)).await.unwrap().into_inner() }
    }))
    .await;
    let metrics = crate::state::http_get(s.running.metrics_addr.unwrap(), "/metrics");
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // The test means something only if some requests shared a forward pass.
    assert!(
        value("twotower_user_tower_batch_size_sum ")
            > value("twotower_user_tower_batch_size_count "),
        "no batch of more than one request"
    );
    // ... and if those batches found their users' inverted lists together (the fixture's index
    // is an IVF), which the searches then scanned.
    assert!(
        value("twotower_coarse_search_seconds_count ") > 0.0,
        "no micro-batch searched the coarse quantizer"
    );
    for ((u, a), t) in users.iter().zip(&alone).zip(&together) {
        assert_eq!(a.items.len(), t.items.len(), "user {u}");
        for (x, y) in a.items.iter().zip(&t.items) {
            // Batched and single forward passes may differ in the last bits (and swap ties).
            assert!(
                (x.score - y.score).abs() < 1e-4,
                "user {u}: alone {:?}, in a batch {:?}",
                a.items,
                t.items
            );
        }
    }
    s.running.stop().await.unwrap();
}
