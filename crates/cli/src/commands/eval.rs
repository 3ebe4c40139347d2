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
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if args.k.is_empty() || args.k.contains(&0) {
        bail!("--k: cut-offs must be positive integers, e.g. 10,50,100");
    }
    let split = match args.split {
        SplitArg::Test => Split::Test,
        SplitArg::Valid => Split::Valid,
    };
    let device = super::device(&args.device)?;
    let out = trainer::evaluate_model(&args.data, &args.model, split, &args.k, device)
        .with_context(|| {
            format!(
                "evaluating {} on {}",
                args.model.display(),
                args.data.display()
            )
        })?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
