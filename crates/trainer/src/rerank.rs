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
pub const WEIGHT_GRID: [f32; 8] = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0];

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

/// The weight (on the dot product) with the best validation NDCG@10 among
/// `WEIGHT_GRID · temperature`, and every weight's metrics. 0 means the second stage did not
/// help and should be left out.
#[allow(clippy::too_many_arguments)]
pub fn choose_weight(
    model: &TwoTower,
    catalog_vecs: &Tensor,
    stage: &SecondStage<'_>,
    valid: &ExampleSet,
    seen: &SeenItems,
    catalog: &Catalog,
    ks: &[usize],
    batch: usize,
) -> (f32, Vec<(f32, Metrics)>) {
    let t = model.temperature().double_value(&[]) as f32;
    let weights: Vec<f32> = WEIGHT_GRID.iter().map(|b| b * t).collect();
    let metrics = evaluate_two_stage(
        model,
        catalog_vecs,
        stage,
        &weights,
        valid,
        seen,
        catalog,
        ks,
        batch,
        |_| true,
    );
    let ndcg = |m: &Metrics| m.get("ndcg@10").copied().unwrap_or(0.0);
    let best = weights
        .iter()
        .zip(&metrics)
        .fold((0.0f32, f64::NEG_INFINITY), |best, (&w, m)| {
            if ndcg(m) > best.1 {
                (w, ndcg(m))
            } else {
                best
            }
        });
    (best.0, weights.into_iter().zip(metrics).collect())
}
