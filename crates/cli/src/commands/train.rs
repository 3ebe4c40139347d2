//! `twotower train`: `DATA_DIR` into `MODEL_DIR`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use trainer::{TrainConfig, TrainOptions};

use crate::progress::Bars;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A prepared dataset (from `twotower prepare`).
    #[arg(long)]
    data: PathBuf,
    /// Where to write the model, metrics and checkpoints.
    #[arg(long)]
    out: PathBuf,
    /// TOML file of training settings (see docs/operations.md); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// auto (CUDA when libtorch sees a GPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    seed: Option<u64>,
    /// Continue after the last completed epoch of an interrupted run in --out.
    #[arg(long)]
    resume: bool,
}

/// Defaults, then the config file, then flags.
pub fn config(
    file: Option<&PathBuf>,
    epochs: Option<usize>,
    batch_size: Option<usize>,
    lr: Option<f64>,
    seed: Option<u64>,
) -> anyhow::Result<TrainConfig> {
    let mut cfg = match file {
        Some(path) => crate::pipeline::file::train_config_file(path)?,
        None => TrainConfig::default(),
    };
    cfg.epochs = epochs.unwrap_or(cfg.epochs);
    cfg.batch_size = batch_size.unwrap_or(cfg.batch_size);
    cfg.lr = lr.unwrap_or(cfg.lr);
    cfg.seed = seed.unwrap_or(cfg.seed);
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = config(
        args.config.as_ref(),
        args.epochs,
        args.batch_size,
        args.lr,
        args.seed,
    )?;
    let device = super::device(&args.device)?;
    train(TrainOptions {
        data: args.data,
        out: args.out,
        config: cfg,
        device,
        resume: args.resume,
    })
}

/// Trains with progress bars and prints the report: `twotower train` and the pipeline's stage.
pub fn train(opts: TrainOptions) -> anyhow::Result<()> {
    let (data, out) = (opts.data.clone(), opts.out.clone());
    let report = trainer::train(opts, &Bars::new())
        .with_context(|| format!("training on {}", data.display()))?;
    outln!("model written to {}", out.display());
    print_metrics(&report);
    outln!(
        "{} epochs (best {}), {:.0} examples/s on {}, {:.1} s, peak RSS {:.0} MiB",
        report.train.epochs,
        report.train.best_epoch,
        report.train.examples_per_sec,
        report.train.device,
        report.train.seconds,
        crate::rss::peak_rss_mib().unwrap_or(f64::NAN)
    );
    Ok(())
}

/// The test metrics of a training report next to the three baselines (and cold/warm items
/// when the data holds cold items).
pub fn print_metrics(report: &trainer::TrainReport) {
    let get = |m: &trainer::ranking::Metrics, k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    outln!(
        "{:<22} {:>10} {:>10} {:>10}",
        "test (full ranking)",
        "recall@10",
        "ndcg@10",
        "recall@50"
    );
    // With a second stage, `test` is the two stages as served and the towers get their own row.
    let mut rows = match &report.test_two_tower {
        Some(towers) => vec![
            ("two-tower + re-rank", &report.test),
            ("  two-tower alone", towers),
        ],
        None => vec![("two-tower", &report.test)],
    };
    rows.extend([
        ("popularity", &report.baseline_popularity),
        ("recent popularity", &report.baseline_recent_popularity),
        ("item-kNN", &report.baseline_item_knn),
    ]);
    for (name, m) in rows {
        outln!(
            "{name:<22} {:>10.4} {:>10.4} {:>10.4}",
            get(m, "recall@10"),
            get(m, "ndcg@10"),
            get(m, "recall@50")
        );
    }
    if let Some(r) = &report.rerank {
        if r.weight > 0.0 {
            let how = if r.fixed {
                "set by rerank_weight"
            } else {
                "chosen on validation"
            };
            outln!(
                "second stage: co-occurrence re-rank of the top {} at weight {:.4}, {how}",
                r.depth,
                r.weight
            );
        } else {
            outln!("second stage: left out (no weight beat the towers alone on validation)");
        }
    }
    if let (Some(cold), Some(warm)) = (&report.cold_items, &report.warm_items) {
        outln!(
            "{:<22} {:>10.4} {:>10.4} {:>10.4}",
            "  cold-item targets",
            get(cold, "recall@10"),
            get(cold, "ndcg@10"),
            get(cold, "recall@50")
        );
        outln!(
            "{:<22} {:>10.4} {:>10.4} {:>10.4}",
            "  warm-item targets",
            get(warm, "recall@10"),
            get(warm, "ndcg@10"),
            get(warm, "recall@50")
        );
    }
    if let Some(exposure) = &report.cold_exposure {
        outln!(
            "cold items: {:.1}% of the catalog, {:.1}% of the top-10 slots, {:.1}% of the top-50",
            100.0 * get(exposure, "catalog_share"),
            100.0 * get(exposure, "top@10_share"),
            100.0 * get(exposure, "top@50_share")
        );
    }
}
