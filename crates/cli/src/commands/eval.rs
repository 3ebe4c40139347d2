//! `twotower eval`: full-ranking metrics of a model, as JSON on stdout.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use features::splits::Split;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SplitArg {
    Test,
    Valid,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "test")]
    split: SplitArg,
    /// Cut-offs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
    k: Vec<usize>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Also measure a second stage (co-occurrence re-rank) at these weights, in units of the
    /// model's temperature (`0` is the towers alone), with co-buyers from the training split:
    /// e.g. `0,1,2,4,8`. Reported as `rerank_sweep`.
    #[arg(long, value_delimiter = ',')]
    rerank_sweep: Vec<f32>,
    /// Candidates the `--rerank-sweep` second stage re-scores.
    #[arg(long, default_value_t = 200)]
    rerank_depth: usize,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if args.k.is_empty() || args.k.contains(&0) {
        bail!("--k: cut-offs must be positive integers, e.g. 10,50,100");
    }
    let split = match args.split {
        SplitArg::Test => Split::Test,
        SplitArg::Valid => Split::Valid,
    };
    if args
        .rerank_sweep
        .iter()
        .any(|b| !(b.is_finite() && *b >= 0.0))
    {
        bail!("--rerank-sweep: weights must be non-negative numbers, e.g. 0,1,2,4");
    }
    if args.rerank_depth == 0 {
        bail!("--rerank-depth: must be at least 1 candidate");
    }
    let sweep = (!args.rerank_sweep.is_empty()).then(|| trainer::RerankSweep {
        betas: args.rerank_sweep.clone(),
        depth: args.rerank_depth,
    });
    let device = super::device(&args.device)?;
    let out = trainer::evaluate_model(
        &args.data,
        &args.model,
        split,
        &args.k,
        device,
        sweep.as_ref(),
    )
    .with_context(|| {
        format!(
            "evaluating {} on {}",
            args.model.display(),
            args.data.display()
        )
    })?;
    outln!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
