//! Training settings: one serde struct with defaults, built from a TOML table (the CLI finds it
//! in `twotower train --config FILE` or a pipeline file's `[train]` table).

use serde::{Deserialize, Serialize};
use towers::TowerConfig;

use crate::error::{Error, Result};

/// How the item-id embedding table starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ItemIdInit {
    /// Normal noise (standard deviation 0.1).
    #[default]
    Random,
    /// The training buyers' co-occurrence, projected to `item_id_dim` dimensions.
    Cooccurrence,
}

/// Whether training adds the second stage ([`towers::cobuyers`]) to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Rerank {
    /// The towers alone.
    #[default]
    Off,
    /// Choose the weight on validation (`rerank::WEIGHT_GRID`), and keep the second stage only
    /// when it beats the towers alone there.
    Auto,
    /// Keep the second stage with `rerank_weight`, whatever validation says (both are still
    /// reported): for a weight chosen elsewhere, such as an online test.
    Fixed,
}

/// Everything tunable about a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Maximum passes over the training examples.
    pub epochs: usize,
    /// Examples per step; every other example's target is a negative (in-batch softmax).
    pub batch_size: usize,
    /// Peak learning rate of AdamW.
    pub lr: f64,
    /// Decoupled weight decay of AdamW.
    pub weight_decay: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup_steps: usize,
    /// The learning rate decays (cosine) to `lr * final_lr_ratio` by the last epoch.
    pub final_lr_ratio: f64,
    /// Global gradient-norm clip.
    pub grad_clip: f64,
    /// Subtract log of each candidate's sampling probability (logQ correction).
    pub logq_correction: bool,
    /// With extra negatives, correct every candidate by its expected count under both samplers
    /// (`B·p + E/|pool|`) instead of only the one that drew it: the estimate of the full softmax
    /// that sampled softmax is meant to be. The Complete Journey pipeline uses it
    /// (`docs/benchmarks.md`); off by default, as on ml-100k it measured the same as the
    /// per-sampler correction.
    pub logq_mixture: bool,
    /// Mask other rows' positives that are the same item as this row's positive.
    pub remove_accidental_hits: bool,
    /// Mask, for each row, the candidates its user interacted with before the target.
    /// Evaluation never ranks those items (it masks everything seen), so as negatives they
    /// only teach the user vector to point away from the user's own history.
    pub remove_seen_negatives: bool,
    /// Extra negatives per batch sampled uniformly from the catalog (mixed negative sampling).
    pub extra_negatives: usize,
    /// Weight of a second term that pulls each item's content-only vector (what a new item
    /// gets) towards its full vector, held fixed: `1 − cosine`, averaged over the batch's items
    /// (`loss::content_alignment_loss`). It gives the content path a target per item besides
    /// the softmax's per-example one; the training loss logged includes it. 0 (the default)
    /// leaves it out: on ml-100k's cold movies it measured no gain (`docs/benchmarks.md`,
    /// session 24).
    pub content_alignment: f64,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: usize,
    /// Users scored per step during evaluation.
    pub eval_batch_size: usize,
    /// On the CPU, each batch is split into this many parts whose towers and softmax rows run
    /// forward and backward on their own threads, one libtorch thread each, every part's rows
    /// against all of the batch's candidates (`parts.rs`): the same loss and gradient as one
    /// part, at more
    /// examples/s than splitting every small operation over the threads (`docs/benchmarks.md`,
    /// session 27). Parts run on up to as many threads as libtorch has (`OMP_NUM_THREADS`,
    /// default the cores), and each part's matrix products on one OpenBLAS thread, so on a
    /// machine with more cores than parts, more parts use them better (measured only on 2
    /// cores). The count, not the machine, decides the dropout masks, so a run follows its
    /// seed on any number of cores. 1 runs the whole batch as one, with every operation split
    /// over the threads; CUDA always does.
    pub cpu_batch_parts: usize,
    /// Run the forward pass in bfloat16/float16 autocast on CUDA.
    pub mixed_precision: bool,
    /// Seed of initialisation, shuffling, dropout and negative sampling.
    pub seed: u64,
    /// How the item-id embedding starts (with `tower.item_id_dim > 0`): `random`, or
    /// `cooccurrence`, a low-rank code of who bought each item in training (`cooccurrence.rs`).
    pub item_id_init: ItemIdInit,
    /// Re-rank the towers' best candidates by co-occurrence with the user's history: `off`,
    /// `auto`, or `fixed` with `rerank_weight`. Off by default: it helps on shop data, and items
    /// nobody bought yet gain nothing from it, which costs a cold-start catalog.
    pub rerank: Rerank,
    /// Candidates the second stage re-scores. 200 lets co-occurring items from below the
    /// towers' top 100 into it; 400 measured the same as 200 (`docs/benchmarks.md`, session 15).
    pub rerank_depth: usize,
    /// The weight of `rerank = "fixed"`, in units of the model's temperature (as
    /// `rerank::WEIGHT_GRID`): `β` adds `β·ln(1 + co-occurrence)` to the towers' logits.
    pub rerank_weight: f32,
    /// The model architecture.
    pub tower: TowerConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            batch_size: 256,
            lr: 2e-3,
            weight_decay: 1e-4,
            warmup_steps: 200,
            final_lr_ratio: 0.05,
            grad_clip: 1.0,
            logq_correction: true,
            logq_mixture: false,
            remove_accidental_hits: true,
            remove_seen_negatives: false,
            extra_negatives: 0,
            content_alignment: 0.0,
            patience: 3,
            eval_batch_size: 512,
            cpu_batch_parts: 2,
            mixed_precision: false,
            seed: 42,
            item_id_init: ItemIdInit::Random,
            rerank: Rerank::Off,
            rerank_depth: 200,
            rerank_weight: 1.0,
            tower: TowerConfig::default(),
        }
    }
}

impl TrainConfig {
    /// A config from a parsed TOML table of its fields (`source` names it in errors). Missing
    /// fields keep their defaults.
    pub fn from_toml_table(table: toml::Table, source: &str) -> Result<TrainConfig> {
        table
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config {
                field: source.to_string(),
                reason: e.to_string(),
            })
    }

    /// Checks the values that the towers' own validation does not cover.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: &str| {
            Err(Error::Config {
                field: field.into(),
                reason: reason.into(),
            })
        };
        if self.batch_size < 2 {
            return bad(
                "batch_size",
                "must be at least 2 (the other rows of a batch are the negatives)",
            );
        }
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if self.eval_batch_size == 0 {
            return bad("eval_batch_size", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.final_lr_ratio) {
            return bad("final_lr_ratio", "must be in [0, 1]");
        }
        if !(self.grad_clip > 0.0 && self.grad_clip.is_finite()) {
            return bad("grad_clip", "must be a positive number");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", "must be a non-negative number");
        }
        if !(self.content_alignment >= 0.0 && self.content_alignment.is_finite()) {
            return bad(
                "content_alignment",
                "must be a non-negative number (0: off)",
            );
        }
        if self.cpu_batch_parts == 0 {
            return bad(
                "cpu_batch_parts",
                "must be at least 1 (1: the batch in one part)",
            );
        }
        if self.patience == 0 {
            return bad("patience", "must be at least 1 epoch");
        }
        if self.rerank_depth == 0 {
            return bad("rerank_depth", "must be at least 1 candidate");
        }
        if self.rerank == Rerank::Fixed
            && !(self.rerank_weight > 0.0 && self.rerank_weight.is_finite())
        {
            return bad(
                "rerank_weight",
                "must be a positive number with rerank = \"fixed\" (use rerank = \"off\" for none)",
            );
        }
        if self.item_id_init == ItemIdInit::Cooccurrence && self.tower.item_id_dim == 0 {
            return bad(
                "item_id_init",
                "\"cooccurrence\" starts the item-id table, which tower.item_id_dim = 0 turns off; \
                 set tower.item_id_dim or item_id_init = \"random\"",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_validates_and_partial_toml_keeps_defaults() {
        TrainConfig::default().validate().unwrap();
        let cfg: TrainConfig = toml::from_str("epochs = 3\n[tower]\ndim = 32\n").unwrap();
        assert_eq!(cfg.epochs, 3);
        assert_eq!(cfg.tower.dim, 32);
        assert_eq!(cfg.batch_size, TrainConfig::default().batch_size);
    }

    #[test]
    fn unknown_fields_and_zero_batch_are_rejected() {
        assert!(toml::from_str::<TrainConfig>("epochz = 3").is_err());
        let cfg = TrainConfig {
            batch_size: 0,
            ..Default::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("batch_size"));
    }

    #[test]
    fn cooccurrence_start_without_item_ids_is_refused_not_ignored() {
        let cfg: TrainConfig = toml::from_str("item_id_init = \"cooccurrence\"\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("item_id_init") && err.contains("item_id_dim"),
            "{err}"
        );
        let cfg: TrainConfig =
            toml::from_str("item_id_init = \"cooccurrence\"\n[tower]\nitem_id_dim = 8\n").unwrap();
        cfg.validate().unwrap();
    }

    #[test]
    fn a_fixed_second_stage_needs_a_positive_weight() {
        let cfg: TrainConfig = toml::from_str("rerank = \"fixed\"\nrerank_weight = 2.0\n").unwrap();
        cfg.validate().unwrap();
        for weight in ["0.0", "-1.0", "nan"] {
            let cfg: TrainConfig =
                toml::from_str(&format!("rerank = \"fixed\"\nrerank_weight = {weight}\n")).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("rerank_weight"), "{weight}: {err}");
        }
    }
}
