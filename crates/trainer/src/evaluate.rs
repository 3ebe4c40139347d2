//! `twotower eval`: full-ranking metrics of a trained model on a prepared dataset, in the same
//! JSON shape as `metrics.json`.

use std::path::Path;

use features::splits::Split;
use serde_json::{json, Value};
use tch::Device;

use crate::artifacts::LoadedModel;
use crate::data::{Dataset, EncodedExample, SeenItems};
use crate::error::Result;
use crate::eval::{self, Scorer};

/// Evaluates `model_dir` on `split` of `data_dir` at cut-offs `ks`.
pub fn evaluate_model(
    data_dir: &Path,
    model_dir: &Path,
    split: Split,
    ks: &[usize],
    device: Device,
) -> Result<Value> {
    let loaded = LoadedModel::load(model_dir, device)?;
    let data = Dataset::open(data_dir)?;
    loaded.check_vocab(data_dir, &data.info.vocab_checksum)?;
    let model = &loaded.model;
    let batch = loaded.info.train.eval_batch_size;
    let set = data.examples(split, &model.config)?;
    let train = data.examples(Split::Train, &model.config)?;
    let seen = SeenItems::load(&data.layout().events(), &data.catalog)?;
    let catalog = &data.catalog;
    let vecs = eval::catalog_vectors(model, catalog, batch);
    let scorer = Scorer::Model {
        model,
        catalog_vecs: &vecs,
    };
    let pop = eval::popularity_scores(&train, catalog.len(), device);
    let all = |_: &EncodedExample| true;
    let mut out = json!({
        split.as_str(): eval::evaluate(&scorer, &set, &seen, catalog, ks, batch, all),
        "baseline_popularity": eval::evaluate(&Scorer::Fixed(&pop), &set, &seen, catalog, ks, batch, all),
        "model_version": loaded.info.version,
    });
    let split_cfg = &data.info.settings.split;
    if split_cfg.cold_items > 0.0 {
        let is_cold = |e: &EncodedExample| split_cfg.is_cold(catalog.ids[e.target_row as usize]);
        out["cold_items"] = json!(eval::evaluate(
            &scorer, &set, &seen, catalog, ks, batch, is_cold
        ));
        out["warm_items"] = json!(eval::evaluate(
            &scorer,
            &set,
            &seen,
            catalog,
            ks,
            batch,
            |e| !is_cold(e)
        ));
    }
    Ok(out)
}
