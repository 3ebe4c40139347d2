//! `twotower train`: the training loop, with per-epoch validation, early stopping on NDCG@10,
//! atomic checkpoints and `--resume`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use features::layout::DataLayout;
use features::splits::Split;
use features::Progress;
use serde::{Deserialize, Serialize};
use tch::Device;
use towers::TwoTower;

use crate::checkpoint::RunState;
use crate::config::{Rerank, TrainConfig};
use crate::error::{Error, Result};
use crate::ranking::{self, Metrics, Scorer, DEFAULT_KS};
use crate::rerank::{self, SecondStage, WeightRule};
use crate::session::Session;
use features::fsutil::write_json;
use towers::artifact::{short, ModelInfo, ModelLayout, MODEL_FORMAT};
use towers::cobuyers::{CoBuyers, RerankInfo};
use towers::dataset::{Dataset, SeenItems};

/// What to train, where, and how.
pub struct TrainOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    pub config: TrainConfig,
    pub device: Device,
    /// Continue from `MODEL_DIR/checkpoint` after the last completed epoch.
    pub resume: bool,
}

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub lr: f64,
    pub temperature: f64,
    pub examples_per_sec: f64,
    pub seconds: f64,
    pub valid: Metrics,
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub test: Metrics,
    pub valid: Metrics,
    pub baseline_popularity: Metrics,
    /// Popularity over the last four weeks of training (`baselines::RECENT_DAYS`).
    #[serde(default)]
    pub baseline_recent_popularity: Metrics,
    /// Item-to-item co-occurrence (cosine) with the user's history.
    #[serde(default)]
    pub baseline_item_knn: Metrics,
    /// The towers alone on the test split, when the model has a second stage (`test` is then
    /// the two stages, as served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_two_tower: Option<Metrics>,
    /// How the second stage was chosen (`rerank = "auto"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank: Option<RerankReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_items: Option<Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_items: Option<Metrics>,
    /// The cold items' share of the towers' top-K slots on the test split, and of the catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_exposure: Option<Metrics>,
    pub train: TrainSummary,
}

/// The validation sweep over the second stage's weight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RerankReport {
    /// The chosen weight on the dot product; 0: the second stage did not help and was left out.
    pub weight: f32,
    pub depth: usize,
    /// Whether `rerank = "fixed"` set the weight (else validation chose it).
    #[serde(default)]
    pub fixed: bool,
    /// Each weight tried, with its validation metrics.
    pub valid: Vec<(f32, Metrics)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub examples_per_sec: f64,
    pub device: String,
    pub epochs: usize,
    pub best_epoch: usize,
    pub seconds: f64,
    pub parameters: i64,
    pub train_examples: usize,
}

/// Trains a model on `opts.data` and writes every artifact into `opts.out`.
pub fn train(opts: TrainOptions, progress: &dyn Progress) -> Result<TrainReport> {
    let started = Instant::now();
    let mut cfg = opts.config.clone();
    cfg.validate()?;
    let data = Dataset::open(&opts.data)?;
    cfg.tower.vocab = data.vocab_sizes();
    cfg.tower.validate()?;

    // A model directory is swapped in whole at the end: refuse a folder of other files now,
    // before the hours of training, rather than delete it then.
    features::fsutil::check_replaceable(
        &opts.out,
        "out",
        "model directory",
        // A run killed while checkpointing leaves only the checkpoint's temporaries.
        &[
            "model.json",
            "checkpoint",
            ".checkpoint.tmp",
            ".checkpoint.old",
        ],
    )?;
    let _one_run = features::fsutil::lock_beside(&opts.out, "model directory")?;
    features::fsutil::check_writable(&opts.out)?;
    progress.start("loading examples", None);
    let train_set = Arc::new(data.examples(Split::Train, &cfg.tower)?);
    let valid_set = data.examples(Split::Valid, &cfg.tower)?;
    let seen = Arc::new(SeenItems::load(&data.layout().events(), &data.catalog)?);
    progress.finish();

    let layout = ModelLayout(opts.out.clone());
    let mut session = Session::open(
        &data,
        Arc::clone(&train_set),
        Some(Arc::clone(&seen)),
        cfg.clone(),
        opts.device,
    )?;
    let mut state = RunState {
        epochs_done: 0,
        best_epoch: 0,
        best_ndcg: f64::NEG_INFINITY,
        log: Vec::new(),
        config: cfg.clone(),
    };
    let restored = if opts.resume {
        session.restore(&layout)?
    } else {
        None
    };
    match restored {
        Some(saved) => {
            tracing::info!(epochs_done = saved.epochs_done, "resuming from checkpoint");
            state = saved;
        }
        None => {
            if opts.resume {
                tracing::warn!(
                    "--resume: no checkpoint in {}, starting from scratch",
                    opts.out.display()
                );
            }
            session.start_item_ids();
        }
    }
    let catalog = Arc::clone(&data.catalog);
    tracing::info!(
        device = %towers::device_name(opts.device),
        parameters = session.model.parameter_count(),
        train_examples = train_set.len(),
        items = catalog.len(),
        "training"
    );

    let mut stale = state
        .log
        .iter()
        .rev()
        .take_while(|l| l.epoch != state.best_epoch)
        .count();
    for epoch in state.epochs_done..cfg.epochs {
        if state.epochs_done > 0 && stale >= cfg.patience {
            tracing::info!(
                epoch,
                best_epoch = state.best_epoch,
                "early stop: validation NDCG@10 stopped improving"
            );
            break;
        }
        let run = session.epoch(epoch, progress)?;
        let valid = evaluate_split(
            &session.model,
            &valid_set,
            &seen,
            &catalog,
            cfg.eval_batch_size,
        );
        let log = EpochLog {
            epoch: epoch + 1,
            train_loss: run.loss,
            lr: run.lr,
            temperature: session.model.temperature().double_value(&[]),
            examples_per_sec: run.examples as f64 / run.seconds,
            seconds: run.seconds,
            valid,
        };
        let ndcg = log.valid.get("ndcg@10").copied().unwrap_or(0.0);
        tracing::info!(
            epoch = epoch + 1,
            loss = format!("{:.4}", run.loss),
            valid_recall_at_10 =
                format!("{:.4}", log.valid.get("recall@10").copied().unwrap_or(0.0)),
            valid_ndcg_at_10 = format!("{ndcg:.4}"),
            examples_per_sec = format!("{:.0}", log.examples_per_sec),
            "epoch done"
        );
        let improved = ndcg > state.best_ndcg;
        if improved {
            state.best_ndcg = ndcg;
            state.best_epoch = epoch + 1;
            stale = 0;
        } else {
            stale += 1;
        }
        state.log.push(log);
        state.epochs_done = epoch + 1;
        session.checkpoint(&layout, &state, improved)?;
    }

    let model = session.finish(&layout)?;

    progress.start("evaluating", None);
    let batch = cfg.eval_batch_size;
    let catalog_vecs = ranking::catalog_vectors(&model, &catalog, batch);
    let rule = match cfg.rerank {
        Rerank::Off => None,
        Rerank::Auto => Some(WeightRule::BestOnValidation),
        Rerank::Fixed => Some(WeightRule::Fixed(cfg.rerank_weight)),
    };
    let cobuyers = rule.map(|_| rerank::fit_cobuyers(&train_set, &catalog));
    let stage = cobuyers.as_ref().map(|cobuyers| SecondStage {
        cobuyers,
        depth: cfg.rerank_depth,
    });
    let (valid, rerank_report) = final_validation(
        &model,
        &catalog_vecs,
        stage.as_ref().zip(rule),
        &valid_set,
        &seen,
        &catalog,
        batch,
    );
    let kept = rerank_report
        .as_ref()
        .filter(|r| r.weight > 0.0)
        .map(|r| r.weight);
    let on_test = crate::evaluate::split_report(
        &model,
        &catalog_vecs,
        stage.as_ref().zip(kept),
        &data,
        &train_set,
        &seen,
        Split::Test,
        &DEFAULT_KS,
        batch,
    )?;
    progress.finish();

    let trained: Vec<&EpochLog> = state.log.iter().collect();
    let examples_per_sec =
        trained.iter().map(|l| l.examples_per_sec).sum::<f64>() / trained.len().max(1) as f64;
    let report = TrainReport {
        test: on_test.model,
        test_two_tower: on_test.two_tower,
        rerank: rerank_report,
        valid,
        baseline_popularity: on_test.popularity,
        baseline_recent_popularity: on_test.recent_popularity,
        baseline_item_knn: on_test.item_knn,
        cold_items: on_test.cold_items,
        warm_items: on_test.warm_items,
        cold_exposure: on_test.cold_exposure,
        train: TrainSummary {
            examples_per_sec,
            device: towers::device_name(opts.device),
            epochs: state.epochs_done,
            best_epoch: state.best_epoch,
            seconds: started.elapsed().as_secs_f64(),
            parameters: model.parameter_count(),
            train_examples: train_set.len(),
        },
    };
    let artifacts = Artifacts {
        second_stage: cobuyers
            .as_ref()
            .zip(kept)
            .map(|(c, weight)| (c, weight, cfg.rerank_depth)),
        data: &data,
        cfg: &cfg,
        model: &model,
        state: &state,
        report: &report,
        device: opts.device,
    };
    write_artifacts(&layout, &artifacts)?;
    Ok(report)
}

/// The final model's validation metrics. With a second stage, they are measured in one pass for
/// every weight the rule names, the rule picks one, and the sweep is returned for `metrics.json`.
fn final_validation(
    model: &TwoTower,
    catalog_vecs: &tch::Tensor,
    stage: Option<(&SecondStage<'_>, WeightRule)>,
    valid_set: &towers::dataset::ExampleSet,
    seen: &SeenItems,
    catalog: &towers::dataset::Catalog,
    batch: usize,
) -> (Metrics, Option<RerankReport>) {
    let Some((stage, rule)) = stage else {
        let scorer = Scorer::Model {
            model,
            catalog_vecs,
        };
        let valid = ranking::evaluate(
            &scorer,
            valid_set,
            seen,
            catalog,
            &DEFAULT_KS,
            batch,
            |_| true,
        );
        return (valid, None);
    };
    let (weight, sweep) = rerank::choose_weight(
        model,
        catalog_vecs,
        stage,
        rule,
        valid_set,
        seen,
        catalog,
        &DEFAULT_KS,
        batch,
    );
    tracing::info!(
        weight,
        depth = stage.depth,
        "second stage chosen on validation"
    );
    let valid = sweep
        .iter()
        .find(|(w, _)| *w == weight)
        .map(|(_, m)| m.clone())
        .expect("the chosen weight was measured");
    let report = RerankReport {
        weight,
        depth: stage.depth,
        fixed: matches!(rule, WeightRule::Fixed(_)),
        valid: sweep,
    };
    (valid, Some(report))
}

fn evaluate_split(
    model: &TwoTower,
    set: &towers::dataset::ExampleSet,
    seen: &SeenItems,
    catalog: &towers::dataset::Catalog,
    batch: usize,
) -> Metrics {
    let vecs = ranking::catalog_vectors(model, catalog, batch);
    ranking::evaluate(
        &Scorer::Model {
            model,
            catalog_vecs: &vecs,
        },
        set,
        seen,
        catalog,
        &DEFAULT_KS,
        batch,
        |_| true,
    )
}

/// What a finished run writes into its model directory.
struct Artifacts<'a> {
    /// The co-buyer lists, weight and depth of a second stage worth keeping.
    second_stage: Option<(&'a CoBuyers, f32, usize)>,
    data: &'a Dataset,
    cfg: &'a TrainConfig,
    model: &'a TwoTower,
    state: &'a RunState,
    report: &'a TrainReport,
    device: Device,
}

fn write_artifacts(layout: &ModelLayout, a: &Artifacts<'_>) -> Result<()> {
    // Everything is written to a staging directory beside MODEL_DIR and swapped in at once: a
    // server or an indexing job reading MODEL_DIR meanwhile sees the old model or the new one,
    // never new weights beside an old model.json. The checkpoint (for --resume) moves along.
    // A failed run's staging directory is removed when it drops.
    let staging = features::fsutil::StagingDir::create(&layout.0, "staging")?;
    let staged = ModelLayout(staging.path().to_path_buf());
    write_model_dir(&staged, a)?;
    // The checkpoint is linked, not moved, into the staging directory: a kill before the swap
    // leaves it where `--resume` looks.
    if layout.checkpoint().exists() {
        link_tree(&layout.checkpoint(), &staged.checkpoint())?;
    }
    Ok(staging.publish(&layout.0)?)
}

/// A copy of the directory `from` at `to`, its files hard-linked (copied where links fail: another
/// file system).
fn link_tree(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let src = entry.map_err(|e| Error::io(from, e))?.path();
        let dst = to.join(src.file_name().unwrap_or_default());
        if src.is_dir() {
            link_tree(&src, &dst)?;
        } else if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    Ok(())
}

/// Writes a complete model directory: weights, `model.json`, metrics, log, curves, vocabularies.
fn write_model_dir(layout: &ModelLayout, a: &Artifacts<'_>) -> Result<()> {
    let Artifacts {
        second_stage,
        data,
        cfg,
        model,
        state,
        report,
        device,
    } = *a;
    model.save(&layout.weights())?;
    let rerank = match second_stage {
        Some((cobuyers, weight, depth)) => {
            cobuyers.save(&layout.cobuyers())?;
            Some(RerankInfo {
                weight,
                depth,
                file: "cobuyers.safetensors".into(),
                sha256: features::fsutil::sha256_file(&layout.cobuyers())?,
            })
        }
        None => None,
    };
    let weights_sha256 = features::fsutil::sha256_file(&layout.weights())?;
    let info = ModelInfo {
        format: MODEL_FORMAT.into(),
        version: short(&weights_sha256).to_string(),
        tower: model.config.clone(),
        train: serde_json::to_value(cfg).expect("serializable"),
        vocab_checksum: data.info.vocab_checksum.clone(),
        dataset_checksum: features::fsutil::sha256_file(&DataLayout(data.dir.clone()).info())?,
        weights: "model.safetensors".into(),
        weights_sha256,
        device: towers::device_name(device),
        rerank,
    };
    write_json(&layout.metrics(), report)?;
    let log: String = state
        .log
        .iter()
        .map(|l| serde_json::to_string(l).expect("serializable") + "\n")
        .collect();
    features::fsutil::write_atomic(&layout.train_log(), log.as_bytes())?;
    let points: Vec<crate::plot::CurvePoint> = state
        .log
        .iter()
        .map(|l| crate::plot::CurvePoint {
            epoch: l.epoch,
            train_loss: l.train_loss,
            valid_recall_at_10: l.valid.get("recall@10").copied().unwrap_or(f64::NAN),
            valid_ndcg_at_10: l.valid.get("ndcg@10").copied().unwrap_or(f64::NAN),
        })
        .collect();
    if let Err(e) = crate::plot::training_curves(&points, &layout.curves()) {
        tracing::warn!("could not draw {}: {e}", layout.curves().display());
    }
    // The vocabularies travel with the model, so that indexer and server tokenize exactly as
    // training did without needing the prepared data.
    towers::artifact::copy_vocab(&data.layout().vocab(), &layout.vocab())?;
    // model.json last: its presence means the directory is complete.
    Ok(write_json(&layout.info(), &info)?)
}
