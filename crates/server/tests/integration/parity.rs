//! Training/serving parity: for test examples, the user vector the server computes over gRPC
//! (its stored history, the example's time as "now") equals the one evaluation computes from
//! the prepared example, to 1e-5. Both go through one history window and one encoder; this
//! catches any skew between them. (Examples whose user has more events after the target than
//! the store's slack are skipped: the bounded store no longer holds their full window.)

use features::splits::Split;
use server::proto::{Context, Filter, RecommendRequest};
use tch::{Device, Kind};

use crate::fixture::{fixture, options, shared_index, start_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_user_vector_equals_the_one_eval_computes_for_the_same_example() {
    let f = fixture();
    // A slack of newer events per user, so that windows at the examples' (past) times are whole.
    let state = tempfile::tempdir().unwrap();
    let mut opts = options(state.path());
    opts.config.history_slack = 16;
    let slack = opts.config.history_slack;
    let mut s = start_with(opts, state).await;
    let loaded = towers::LoadedModel::load(&f.model, Device::Cpu).unwrap();
    let data = towers::dataset::Dataset::open(&f.data).unwrap();
    let test = data.examples(Split::Test, &loaded.info.tower).unwrap();
    let catalog_vecs = trainer::ranking::catalog_vectors(&loaded.model, &data.catalog, 256);
    let index = indexer::IndexVersion::open_current(shared_index()).unwrap();
    // The store keeps `history_len + history_slack` events per user: a past time is exact when
    // at most `history_slack` of the user's events are at or after it.
    let reproducible = test.examples.iter().filter(|ex| {
        let later = f
            .events
            .iter()
            .filter(|e| e.user_id == ex.user_id && e.ts_ms >= ex.ts_ms)
            .count();
        later <= slack
    });
    let (mut compared, mut with_history) = (0, 0);
    for ex in reproducible.take(40) {
        let user = trainer::ranking::user_vectors(&loaded.model, &test, &[ex], &catalog_vecs);
        let user: Vec<f32> = user.to_kind(Kind::Float).view([-1]).try_into().unwrap();
        let served = s
            .client
            .recommend(RecommendRequest {
                user_id: Some(ex.user_id),
                context: Some(Context {
                    ts_ms: ex.ts_ms,
                    user_features: vec![],
                }),
                k: 20,
                filter: Some(Filter {
                    exclude_seen: Some(false),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!served.fallback);
        assert_eq!(served.items.len(), 20);
        for item in &served.items {
            let row = index.row_of[&item.item_id] as usize;
            let expected: f32 = index
                .embeddings
                .vector(row)
                .iter()
                .zip(&user)
                .map(|(a, b)| a * b)
                .sum();
            assert!(
                (item.score - expected).abs() < 1e-5,
                "user {} at {}: item {} served score {} but eval's user vector gives {expected}",
                ex.user_id,
                ex.ts_ms,
                item.item_id,
                item.score
            );
            compared += 1;
        }
        with_history += (!ex.history.is_empty()) as usize;
    }
    assert!(
        compared >= 400 && with_history >= 10,
        "{compared} scores, {with_history} histories"
    );
    s.running.stop().await.unwrap();
}
