//! Ranking metrics by full ranking (RecBole's `mode: full`): each target is ranked against every item in
//! the catalog that the user has not interacted with before the target.
//!
//! Metrics per cut-off K: `recall@K` (hit rate; one target per example), `ndcg@K`
//! (`1 / log2(rank + 2)` for a hit) and `mrr@K` (`1 / (rank + 1)` for a hit), with 0-based rank.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};
use towers::{ItemBatchHost, TwoTower, UserBatchHost};

use crate::baselines::{Baselines, ItemKnn};
use crate::rerank::{evaluate_two_stage, SecondStage};
use towers::dataset::{Catalog, EncodedExample, ExampleSet, SeenItems};

/// Cut-offs reported by default.
pub const DEFAULT_KS: [usize; 3] = [10, 50, 100];

/// Metric name (`recall@10`, ...) → value, plus `examples`.
pub type Metrics = BTreeMap<String, f64>;

/// The item tower over the whole catalog, in eval mode: `[N, dim]` on `device`.
pub fn catalog_vectors(model: &TwoTower, catalog: &Catalog, batch: usize) -> Tensor {
    let device = model.device();
    tch::no_grad(|| {
        let chunks: Vec<Tensor> = catalog
            .tokens
            .chunks(batch.max(1))
            .map(|chunk| {
                let refs: Vec<_> = chunk.iter().collect();
                model.encode_items(
                    &ItemBatchHost::new(&refs, &model.config).to_device(device),
                    false,
                )
            })
            .collect();
        if chunks.is_empty() {
            Tensor::zeros([0, model.config.dim], (Kind::Float, device))
        } else {
            Tensor::cat(&chunks, 0)
        }
    })
}

/// What to score each example with.
pub enum Scorer<'a> {
    /// The user tower against the catalog vectors.
    Model {
        model: &'a TwoTower,
        catalog_vecs: &'a Tensor,
    },
    /// A fixed score per catalog row (e.g. popularity), the same for every user.
    Fixed(&'a Tensor),
    /// Item-to-item co-occurrence with the example's history.
    ItemKnn(&'a ItemKnn),
}

/// The user vectors of `examples` (`[B, dim]`, eval mode) over the catalog's item vectors:
/// what evaluation ranks with, and what the server must reproduce for the same user and time.
pub fn user_vectors(
    model: &TwoTower,
    set: &ExampleSet,
    examples: &[&EncodedExample],
    catalog_vecs: &Tensor,
) -> Tensor {
    let users: Vec<_> = examples
        .iter()
        .map(|e| set.user_input(e, |r| r as i64))
        .collect();
    let inputs = UserBatchHost::new(&users, &model.config).to_device(model.device());
    tch::no_grad(|| model.encode_users(&inputs, catalog_vecs, false))
}

/// Ranks the targets of the selected examples; returns metrics for each K in `ks`.
pub fn evaluate(
    scorer: &Scorer<'_>,
    set: &ExampleSet,
    seen: &SeenItems,
    catalog: &Catalog,
    ks: &[usize],
    batch: usize,
    select: impl Fn(&EncodedExample) -> bool,
) -> Metrics {
    let chosen: Vec<&EncodedExample> = set.examples.iter().filter(|e| select(e)).collect();
    let mut ranks = Vec::with_capacity(chosen.len());
    tch::no_grad(|| {
        for chunk in chosen.chunks(batch.max(1)) {
            let scores = scores_of(scorer, set, chunk);
            ranks.extend(rank_targets(scores, chunk, seen, catalog));
        }
    });
    metrics_from_ranks(&ranks, ks)
}

/// `[B, N]` scores of `chunk`'s examples over the catalog.
fn scores_of(scorer: &Scorer<'_>, set: &ExampleSet, chunk: &[&EncodedExample]) -> Tensor {
    match scorer {
        Scorer::Model {
            model,
            catalog_vecs,
        } => {
            let uv = user_vectors(model, set, chunk, catalog_vecs);
            uv.matmul(&catalog_vecs.tr())
        }
        Scorer::Fixed(fixed) => fixed
            .unsqueeze(0)
            .expand([chunk.len() as i64, -1], false)
            .copy(),
        Scorer::ItemKnn(knn) => knn.scores(chunk),
    }
}

/// One split's metrics: the model, the three baselines, and — when the data holds held-out
/// cold items — the model on cold-item and on warm-item targets separately.
pub struct SplitMetrics {
    /// What the model serves: the towers, then the second stage when the model has one.
    pub model: Metrics,
    /// The towers alone, when the model has a second stage.
    pub two_tower: Option<Metrics>,
    pub popularity: Metrics,
    pub recent_popularity: Metrics,
    pub item_knn: Metrics,
    pub cold_items: Option<Metrics>,
    pub warm_items: Option<Metrics>,
    /// How much of the towers' top-K the held-out cold items get, next to their share of the
    /// catalog ([`cold_exposure`]).
    pub cold_exposure: Option<Metrics>,
}

/// What one split is ranked with: the model's examples (history cut to the tower's length) and
/// the same examples with the whole stored history, which item-kNN scores against.
pub struct EvalInputs<'a> {
    pub set: &'a ExampleSet,
    pub full_history: &'a ExampleSet,
    pub seen: &'a SeenItems,
    pub catalog: &'a Catalog,
}

/// Everything `metrics.json` and `twotower eval` report for one split. With `stage` (the
/// second stage and its weight), `model` is the two stages and `two_tower` the towers alone.
#[allow(clippy::too_many_arguments)]
pub fn split_metrics(
    model: &TwoTower,
    catalog_vecs: &Tensor,
    stage: Option<(&SecondStage<'_>, f32)>,
    baselines: &Baselines,
    inputs: &EvalInputs<'_>,
    split: &features::splits::SplitConfig,
    ks: &[usize],
    batch: usize,
) -> SplitMetrics {
    let scorer = Scorer::Model {
        model,
        catalog_vecs,
    };
    let (seen, catalog) = (inputs.seen, inputs.catalog);
    let run = |scorer: &Scorer<'_>, set: &ExampleSet, select: &dyn Fn(&EncodedExample) -> bool| {
        evaluate(scorer, set, seen, catalog, ks, batch, select)
    };
    // The model as served, for each weight in `weights` (0: the towers alone).
    let served = |weights: &[f32], select: &dyn Fn(&EncodedExample) -> bool| match stage {
        Some((stage, _)) => evaluate_two_stage(
            model,
            catalog_vecs,
            stage,
            weights,
            inputs.set,
            seen,
            catalog,
            ks,
            batch,
            select,
        ),
        None => vec![run(&scorer, inputs.set, select)],
    };
    let is_cold = |e: &EncodedExample| split.is_cold(catalog.ids[e.target_row as usize]);
    let with_cold = split.cold_items > 0.0;
    let all = |_: &EncodedExample| true;
    let weight = stage.map_or(0.0, |(_, w)| w);
    let (model_metrics, two_tower) = match stage {
        Some((_, w)) => {
            let mut both = served(&[0.0, w], &all);
            let system = both.pop().expect("two weights");
            (system, both.pop())
        }
        None => (served(&[0.0], &all).remove(0), None),
    };
    SplitMetrics {
        model: model_metrics,
        two_tower,
        popularity: run(&Scorer::Fixed(&baselines.popularity), inputs.set, &all),
        recent_popularity: run(
            &Scorer::Fixed(&baselines.recent_popularity),
            inputs.set,
            &all,
        ),
        item_knn: run(
            &Scorer::ItemKnn(&baselines.item_knn),
            inputs.full_history,
            &all,
        ),
        cold_items: with_cold.then(|| served(&[weight], &is_cold).remove(0)),
        warm_items: with_cold.then(|| served(&[weight], &|e| !is_cold(e)).remove(0)),
        cold_exposure: with_cold.then(|| {
            let cold: Vec<bool> = catalog.ids.iter().map(|&id| split.is_cold(id)).collect();
            cold_exposure(&scorer, inputs, &cold, ks, batch)
        }),
    }
}

/// The share of the top-K slots, over every example of `inputs`, that go to items marked in
/// `cold` (`top@K_share`), next to their share of the catalog (`catalog_share`). A cold-start
/// model whose cold items get about their catalog share of the slots shows new items as often
/// as old ones; a low cold-item recall beside a fair share says the content picks the wrong
/// new items, not too few. The towers' top K, before any second stage.
pub fn cold_exposure(
    scorer: &Scorer<'_>,
    inputs: &EvalInputs<'_>,
    cold: &[bool],
    ks: &[usize],
    batch: usize,
) -> Metrics {
    let n = cold.len();
    let max_k = ks.iter().copied().max().unwrap_or(0).min(n);
    let mut cold_slots = vec![0u64; ks.len()];
    let mut slots = vec![0u64; ks.len()];
    let examples: Vec<&EncodedExample> = inputs.set.examples.iter().collect();
    tch::no_grad(|| {
        for chunk in examples.chunks(batch.max(1)) {
            let mut scores = scores_of(scorer, inputs.set, chunk);
            mask_seen(&mut scores, chunk, inputs.seen, inputs.catalog);
            let top = scores.topk(max_k as i64, 1, true, true);
            let (top_scores, rows) = (top.0.to_device(Device::Cpu), top.1.to_device(Device::Cpu));
            let top_scores = Vec::<f32>::try_from(top_scores.view(-1)).expect("f32 scores");
            let rows = Vec::<i64>::try_from(rows.view(-1)).expect("i64 rows");
            for (scores, rows) in top_scores
                .chunks(max_k.max(1))
                .zip(rows.chunks(max_k.max(1)))
            {
                for (j, &k) in ks.iter().enumerate() {
                    // Masked (already seen) items are never shown.
                    let shown = scores
                        .iter()
                        .zip(rows)
                        .take(k)
                        .filter(|(s, _)| s.is_finite());
                    for (_, &row) in shown {
                        slots[j] += 1;
                        cold_slots[j] += cold[row as usize] as u64;
                    }
                }
            }
        }
    });
    let mut m = Metrics::new();
    let n_cold = cold.iter().filter(|&&c| c).count();
    m.insert("catalog_share".into(), n_cold as f64 / n.max(1) as f64);
    for (j, &k) in ks.iter().enumerate() {
        let share = cold_slots[j] as f64 / slots[j].max(1) as f64;
        m.insert(format!("top@{k}_share"), share);
    }
    m
}

/// 0-based rank of each example's target among the items not seen before it.
fn rank_targets(
    mut scores: Tensor,
    chunk: &[&EncodedExample],
    seen: &SeenItems,
    catalog: &Catalog,
) -> Vec<i64> {
    mask_seen(&mut scores, chunk, seen, catalog);
    ranks_of_targets(&scores, chunk)
}

/// Sets the scores of the items each example's user interacted with before its target to -∞:
/// they are never recommended, so they are not ranked.
pub(crate) fn mask_seen(
    scores: &mut Tensor,
    chunk: &[&EncodedExample],
    seen: &SeenItems,
    catalog: &Catalog,
) {
    let device = scores.device();
    let (mut rows, mut cols) = (Vec::new(), Vec::new());
    for (i, ex) in chunk.iter().enumerate() {
        let target_item = catalog.ids[ex.target_row as usize];
        for r in seen.before(ex.user_id, target_item) {
            rows.push(i as i64);
            cols.push(r as i64);
        }
    }
    if !rows.is_empty() {
        let index = [
            Some(Tensor::from_slice(&rows).to_device(device)),
            Some(Tensor::from_slice(&cols).to_device(device)),
        ];
        let _ = scores.index_put_(
            &index,
            &Tensor::from(f32::NEG_INFINITY).to_device(device),
            false,
        );
    }
}

/// 0-based rank of each example's target under `scores` (`[B, N]`, seen items already masked).
pub(crate) fn ranks_of_targets(scores: &Tensor, chunk: &[&EncodedExample]) -> Vec<i64> {
    let device = scores.device();
    let targets: Vec<i64> = chunk.iter().map(|e| e.target_row as i64).collect();
    let target_scores = scores.gather(
        1,
        &Tensor::from_slice(&targets).to_device(device).unsqueeze(1),
        false,
    );
    // Ties count against the target (items with identical content score identically), and a
    // NaN score — a broken model — ranks last rather than first.
    let n = scores.size()[1];
    let ranks = scores
        .ge_tensor(&target_scores)
        .sum_dim_intlist(1, false, Kind::Int64)
        - 1;
    let valid = target_scores.squeeze_dim(1).isnan().logical_not();
    let ranks = ranks.where_self(&valid, &ranks.full_like(n));
    Vec::<i64>::try_from(ranks.to_device(Device::Cpu)).expect("int64 ranks")
}

/// Aggregates 0-based ranks into recall, NDCG and MRR at each K.
pub fn metrics_from_ranks(ranks: &[i64], ks: &[usize]) -> Metrics {
    let n = ranks.len().max(1) as f64;
    let mut m = Metrics::new();
    for &k in ks {
        let hits = ranks.iter().filter(|&&r| (r as usize) < k);
        let (mut recall, mut ndcg, mut mrr) = (0.0, 0.0, 0.0);
        for &r in hits {
            recall += 1.0;
            ndcg += 1.0 / ((r as f64) + 2.0).log2();
            mrr += 1.0 / ((r as f64) + 1.0);
        }
        m.insert(format!("recall@{k}"), recall / n);
        m.insert(format!("ndcg@{k}"), ndcg / n);
        m.insert(format!("mrr@{k}"), mrr / n);
    }
    m.insert("examples".into(), ranks.len() as f64);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_exposure_counts_the_top_k_slots_shown_and_never_a_seen_item() {
        let catalog = crate::cooccurrence::tests::bare_catalog(vec![10, 11, 12, 13, 14]);
        // User 1 saw items 10 and 11 before its target 12; user 2 saw nothing.
        let set = crate::cooccurrence::tests::bought(&[(1, 2), (2, 0)]);
        let seen: SeenItems = [(1, 10, 0), (1, 11, 1), (1, 12, 2), (2, 10, 0)]
            .into_iter()
            .collect();
        let inputs = EvalInputs {
            set: &set,
            full_history: &set,
            seen: &seen,
            catalog: &catalog,
        };
        let scores = Tensor::from_slice(&[5.0f32, 4.0, 3.0, 2.0, 1.0]);
        let cold = [false, false, false, true, true];
        let m = cold_exposure(&Scorer::Fixed(&scores), &inputs, &cold, &[2, 5], 1);
        assert!((m["catalog_share"] - 0.4).abs() < 1e-12);
        // Top 2: rows 2 and 3 for user 1 (0 and 1 are masked), rows 0 and 1 for user 2.
        assert!((m["top@2_share"] - 1.0 / 4.0).abs() < 1e-12, "{m:?}");
        // Top 5: the 3 rows user 1 may be shown (2 cold) and all 5 for user 2 (2 cold).
        assert!((m["top@5_share"] - 4.0 / 8.0).abs() < 1e-12, "{m:?}");
    }

    #[test]
    fn metrics_follow_their_definitions() {
        let m = metrics_from_ranks(&[0, 1, 9, 10, 60], &[10, 50]);
        assert!((m["recall@10"] - 3.0 / 5.0).abs() < 1e-12);
        assert!((m["recall@50"] - 4.0 / 5.0).abs() < 1e-12);
        let ndcg10 = (1.0 + 1.0 / 3f64.log2() + 1.0 / 11f64.log2()) / 5.0;
        assert!((m["ndcg@10"] - ndcg10).abs() < 1e-12);
        assert!((m["mrr@10"] - (1.0 + 0.5 + 0.1) / 5.0).abs() < 1e-12);
        assert_eq!(m["examples"], 5.0);
    }
}
