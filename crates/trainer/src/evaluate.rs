//! `twotower eval`: full-ranking metrics of a trained model on a prepared dataset, in the same
//! JSON shape as `metrics.json`.

use std::path::Path;

use features::splits::Split;
use serde_json::{json, Value};
use tch::{Device, Tensor};

use crate::baselines::Baselines;
use crate::error::Result;
use crate::ranking::{self, EvalInputs, SplitMetrics};
use crate::rerank::{self, SecondStage};
use towers::artifact::LoadedModel;
use towers::dataset::{Dataset, ExampleSet, SeenItems};
use towers::TwoTower;

/// One split's metrics for the model (with its second stage, if any) and the three baselines, on
/// the same examples with the same masking: what `train` reports for the test split and `eval`
/// for any split. `vecs` are the catalog's item vectors ([`ranking::catalog_vectors`]).
/// Everything runs on the model's device.
#[allow(clippy::too_many_arguments)]
pub fn split_report(
    model: &TwoTower,
    vecs: &Tensor,
    stage: Option<(&SecondStage<'_>, f32)>,
    data: &Dataset,
    train: &ExampleSet,
    seen: &SeenItems,
    split: Split,
    ks: &[usize],
    batch: usize,
) -> Result<SplitMetrics> {
    let set = data.examples(split, &model.config)?;
    let full_history = data.examples_with_history(split, usize::MAX)?;
    let baselines = Baselines::fit(data, train, model.device())?;
    let inputs = EvalInputs {
        set: &set,
        full_history: &full_history,
        seen,
        catalog: &data.catalog,
    };
    let split_cfg = &data.info.settings.split;
    Ok(ranking::split_metrics(
        model, vecs, stage, &baselines, &inputs, split_cfg, ks, batch,
    ))
}

/// Second-stage weights for `eval` to measure, whether or not the model has a second stage:
/// what `rerank = "auto"` would find with another grid or depth, without training again.
#[derive(Debug, Clone, PartialEq)]
pub struct RerankSweep {
    /// Weights in units of the model's temperature, as [`crate::rerank::WEIGHT_GRID`].
    pub betas: Vec<f32>,
    /// Candidates re-scored per example.
    pub depth: usize,
}

/// Evaluates `model_dir` on `split` of `data_dir` at cut-offs `ks`, and measures `sweep`.
pub fn evaluate_model(
    data_dir: &Path,
    model_dir: &Path,
    split: Split,
    ks: &[usize],
    device: Device,
    sweep: Option<&RerankSweep>,
) -> Result<Value> {
    let loaded = LoadedModel::load(model_dir, device)?;
    let data = Dataset::open(data_dir)?;
    loaded.check_vocab(data_dir, &data.info.vocab_checksum)?;
    let model = &loaded.model;
    let batch = serde_json::from_value::<crate::TrainConfig>(loaded.info.train.clone())
        .map(|t| t.eval_batch_size)
        .unwrap_or_else(|_| crate::TrainConfig::default().eval_batch_size);
    let train = data.examples(Split::Train, &model.config)?;
    let seen = SeenItems::load(&data.layout().events(), &data.catalog)?;
    let reranker = loaded.reranker()?;
    let stage = reranker.as_ref().map(|r| {
        let stage = SecondStage {
            cobuyers: &r.cobuyers,
            depth: r.depth,
        };
        (stage, r.weight)
    });
    let vecs = ranking::catalog_vectors(model, &data.catalog, batch);
    let m = split_report(
        model,
        &vecs,
        stage.as_ref().map(|(s, w)| (s, *w)),
        &data,
        &train,
        &seen,
        split,
        ks,
        batch,
    )?;
    let mut out = json!({
        split.as_str(): m.model,
        "baseline_popularity": m.popularity,
        "baseline_recent_popularity": m.recent_popularity,
        "baseline_item_knn": m.item_knn,
        "model_version": loaded.info.version,
    });
    if let (Some(two_tower), Some(r)) = (m.two_tower, &reranker) {
        out[format!("{}_two_tower", split.as_str())] = json!(two_tower);
        out["rerank"] = json!({"weight": r.weight, "depth": r.depth});
    }
    if let (Some(cold), Some(warm)) = (m.cold_items, m.warm_items) {
        out["cold_items"] = json!(cold);
        out["warm_items"] = json!(warm);
    }
    if let Some(exposure) = m.cold_exposure {
        out["cold_exposure"] = json!(exposure);
    }
    if let Some(sweep) = sweep {
        let set = data.examples(split, &model.config)?;
        let cobuyers = rerank::fit_cobuyers(&train, &data.catalog);
        let stage = SecondStage {
            cobuyers: &cobuyers,
            depth: sweep.depth,
        };
        let measured = rerank::measure_betas(
            model,
            &vecs,
            &stage,
            &sweep.betas,
            &set,
            &seen,
            &data.catalog,
            ks,
            batch,
        );
        let rows: Vec<Value> = sweep
            .betas
            .iter()
            .zip(measured)
            .map(|(beta, (weight, m))| {
                json!({"beta": beta, "weight": weight, "depth": sweep.depth, "metrics": m})
            })
            .collect();
        out["rerank_sweep"] = json!(rows);
    }
    Ok(out)
}
