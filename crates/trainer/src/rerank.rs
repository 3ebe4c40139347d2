//! Measuring the second stage ([`towers::cobuyers`]) and choosing its weight on validation.
//!
//! The towers rank the whole catalog; the `depth` best unseen items are re-scored with
//! [`towers::cobuyers::blend`], exactly as the server re-scores what FAISS returns, and a target
//! is ranked among them. A target the towers place below `depth` keeps the towers' rank (it is
//! never among the re-ranked candidates), so every metric at a cut-off up to `depth` is the
//! served system's.

use tch::Tensor;
use towers::cobuyers::{blend, CoBuyers};
use towers::dataset::{Catalog, EncodedExample, ExampleSet, SeenItems, NONE};
use towers::TwoTower;

use crate::baselines::training_buyers;
use crate::ranking::{mask_seen, metrics_from_ranks, ranks_of_targets, user_vectors, Metrics};

/// The weights tried on validation, in units of the model's temperature: a weight of `β·T` on
/// the dot product is `β` on the logits the towers were trained with. 0 is the towers alone.
pub const WEIGHT_GRID: [f32; 11] = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0];

/// What `rerank = "auto"` weighs a second stage by: the figures every report leads with, the
/// top of the list and the longer list a page or a carousel shows.
pub const CHOICE_METRICS: [&str; 3] = ["recall@10", "ndcg@10", "recall@50"];

/// The co-buyer lists of the training targets, by item id: item-kNN's memory, for the server.
pub fn fit_cobuyers(train: &ExampleSet, catalog: &Catalog) -> CoBuyers {
    let (users_of, _) = training_buyers(train, catalog.len());
    CoBuyers::new(
        users_of
            .into_iter()
            .enumerate()
            .map(|(row, users)| (catalog.ids[row], users)),
    )
}

/// What the second stage re-scores with.
pub struct SecondStage<'a> {
    pub cobuyers: &'a CoBuyers,
    /// Candidates re-scored per example.
    pub depth: usize,
}

/// The metrics of the two stages for each weight in `weights` (on the dot product), from one
/// pass of the towers over the selected examples of `set`. Weight 0 is the towers alone.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_two_stage(
    model: &TwoTower,
    catalog_vecs: &Tensor,
    stage: &SecondStage<'_>,
    weights: &[f32],
    set: &ExampleSet,
    seen: &SeenItems,
    catalog: &Catalog,
    ks: &[usize],
    batch: usize,
    select: impl Fn(&EncodedExample) -> bool,
) -> Vec<Metrics> {
    let chosen: Vec<&EncodedExample> = set.examples.iter().filter(|e| select(e)).collect();
    let depth = stage.depth.min(catalog.len()).max(1) as i64;
    let mut ranks: Vec<Vec<i64>> = vec![Vec::with_capacity(chosen.len()); weights.len()];
    tch::no_grad(|| {
        for chunk in chosen.chunks(batch.max(1)) {
            let uv = user_vectors(model, set, chunk, catalog_vecs);
            let mut scores = uv.matmul(&catalog_vecs.tr());
            mask_seen(&mut scores, chunk, seen, catalog);
            let first = ranks_of_targets(&scores, chunk);
            let (top, rows) = scores.topk(depth, 1, true, true);
            let top =
                Vec::<f32>::try_from(top.to_device(tch::Device::Cpu).view(-1)).expect("f32 scores");
            let rows =
                Vec::<i64>::try_from(rows.to_device(tch::Device::Cpu).view(-1)).expect("i64 rows");
            for (i, ex) in chunk.iter().enumerate() {
                let span = i * depth as usize..(i + 1) * depth as usize;
                let (top, rows) = (&top[span.clone()], &rows[span]);
                let at = rows.iter().position(|&r| r == ex.target_row as i64);
                let Some(at) = at.filter(|_| first[i] < depth) else {
                    for r in &mut ranks {
                        r.push(first[i]);
                    }
                    continue;
                };
                let history: Vec<u64> = ex
                    .history
                    .iter()
                    .filter(|h| h.item_row != NONE)
                    .map(|h| catalog.ids[h.item_row as usize])
                    .collect();
                let candidates: Vec<u64> = rows.iter().map(|&r| catalog.ids[r as usize]).collect();
                let co = stage.cobuyers.scores(&history, &candidates);
                for (w, r) in weights.iter().zip(&mut ranks) {
                    let blended: Vec<f32> = top
                        .iter()
                        .zip(&co)
                        .map(|(&s, &c)| s + blend(*w, c))
                        .collect();
                    let target = blended[at];
                    // Ties count against the target, as in the first stage.
                    r.push(blended.iter().filter(|&&s| s >= target).count() as i64 - 1);
                }
            }
        }
    });
    ranks.iter().map(|r| metrics_from_ranks(r, ks)).collect()
}

/// How the second stage's weight is picked from the validation sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightRule {
    /// The best validation gain over the towers alone across [`CHOICE_METRICS`], over
    /// `WEIGHT_GRID` ([`best_weight`]); 0 (no second stage) when none gains.
    BestOnValidation,
    /// This `β` (in units of the temperature), measured next to the towers alone.
    Fixed(f32),
}

impl WeightRule {
    /// The `β`s measured on validation.
    fn betas(self) -> Vec<f32> {
        match self {
            WeightRule::BestOnValidation => WEIGHT_GRID.to_vec(),
            WeightRule::Fixed(beta) => vec![0.0, beta],
        }
    }
}

/// The metrics of the two stages over all of `set` at each `β` of `betas` (in units of the
/// model's temperature), as `(weight on the dot product, metrics)`: what `rerank = "auto"`
/// measures on validation and `eval --rerank-sweep` on any split.
#[allow(clippy::too_many_arguments)]
pub fn measure_betas(
    model: &TwoTower,
    catalog_vecs: &Tensor,
    stage: &SecondStage<'_>,
    betas: &[f32],
    set: &ExampleSet,
    seen: &SeenItems,
    catalog: &Catalog,
    ks: &[usize],
    batch: usize,
) -> Vec<(f32, Metrics)> {
    let t = model.temperature().double_value(&[]) as f32;
    let weights: Vec<f32> = betas.iter().map(|b| b * t).collect();
    let metrics = evaluate_two_stage(
        model,
        catalog_vecs,
        stage,
        &weights,
        set,
        seen,
        catalog,
        ks,
        batch,
        |_| true,
    );
    weights.into_iter().zip(metrics).collect()
}

/// The weight (on the dot product) that `rule` picks, and the metrics of every weight measured
/// on validation ([`measure_betas`] of the rule's `β`s). 0 means no second stage.
#[allow(clippy::too_many_arguments)]
pub fn choose_weight(
    model: &TwoTower,
    catalog_vecs: &Tensor,
    stage: &SecondStage<'_>,
    rule: WeightRule,
    valid: &ExampleSet,
    seen: &SeenItems,
    catalog: &Catalog,
    ks: &[usize],
    batch: usize,
) -> (f32, Vec<(f32, Metrics)>) {
    let sweep = measure_betas(
        model,
        catalog_vecs,
        stage,
        &rule.betas(),
        valid,
        seen,
        catalog,
        ks,
        batch,
    );
    let chosen = match rule {
        WeightRule::Fixed(_) => sweep[1].0,
        WeightRule::BestOnValidation => best_weight(&sweep),
    };
    (chosen, sweep)
}

/// The weight of `sweep` (weight, metrics) whose metrics gain most over the towers alone (its
/// weight 0), as the
/// mean relative gain across [`CHOICE_METRICS`]; 0 when no weight gains. A mean of the three
/// rather than one metric: NDCG@10 alone picks weights that leave recall@50 behind, and
/// recall@50 alone weights that cost the top ten (`docs/benchmarks.md`, session 15). Ties keep the
/// smaller weight.
pub fn best_weight(sweep: &[(f32, Metrics)]) -> f32 {
    let Some((_, base)) = sweep.iter().find(|(w, _)| *w == 0.0) else {
        return 0.0;
    };
    let value = |m: &Metrics, key: &str| m.get(key).copied().unwrap_or(0.0);
    let gain = |m: &Metrics| {
        CHOICE_METRICS
            .iter()
            .map(|k| (value(m, k) - value(base, k)) / value(base, k).max(1e-12))
            .sum::<f64>()
            / CHOICE_METRICS.len() as f64
    };
    sweep
        .iter()
        .fold((0.0f32, 0.0f64), |best, (w, m)| {
            let g = gain(m);
            if g > best.1 {
                (*w, g)
            } else {
                best
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(r10: f64, n10: f64, r50: f64) -> Metrics {
        [("recall@10", r10), ("ndcg@10", n10), ("recall@50", r50)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    fn sweep(weights: &[f32], metrics: &[Metrics]) -> Vec<(f32, Metrics)> {
        weights
            .iter()
            .copied()
            .zip(metrics.iter().cloned())
            .collect()
    }

    #[test]
    fn the_weight_chosen_gains_across_the_top_ten_and_the_top_fifty() {
        let weights = [0.0, 0.1, 0.2, 0.4];
        let m = [
            metrics(0.0100, 0.0050, 0.0400),
            // The best NDCG@10, but recall@50 falls.
            metrics(0.0104, 0.0053, 0.0380),
            // A little less NDCG@10, and more of everything else.
            metrics(0.0104, 0.0052, 0.0420),
            // The best recall@50, at a cost to the top ten.
            metrics(0.0090, 0.0045, 0.0450),
        ];
        assert_eq!(best_weight(&sweep(&weights, &m)), 0.2);
    }

    #[test]
    fn no_weight_is_chosen_when_none_beats_the_towers_alone() {
        let weights = [0.0, 0.1, 0.2];
        let m = [
            metrics(0.0100, 0.0050, 0.0400),
            metrics(0.0090, 0.0050, 0.0400),
            metrics(0.0100, 0.0040, 0.0390),
        ];
        assert_eq!(best_weight(&sweep(&weights, &m)), 0.0);
        assert_eq!(
            best_weight(&sweep(&[0.1, 0.2], &m[1..])),
            0.0,
            "no weight 0 to compare with"
        );
    }
}
