//! `twotower bench`: throughput measurements that write a JSON report.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Training examples/s, FLOPs per example and the fraction of the machine's matmul peak.
    Train(BenchTrainArgs),
    /// Load test of a running server: Recommend/s and latency percentiles (closed loop with
    /// --concurrency, or open loop at a fixed --rate), with RecordEvents alongside.
    Serve(super::serve::BenchServeArgs),
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// A prepared dataset (default model: ml-100k).
    #[arg(long)]
    data: PathBuf,
    /// TOML training settings; the default model when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Timed training steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Train(args) => {
            if args.steps == 0 {
                anyhow::bail!("--steps must be at least 1");
            }
            let cfg =
                super::train::config(args.config.as_ref(), None, args.batch_size, None, None)?;
            let device = super::device(&args.device)?;
            let report =
                trainer::bench::bench_train(&args.data, cfg, device, args.warmup, args.steps)
                    .with_context(|| format!("benchmarking training on {}", args.data.display()))?;
            let json = serde_json::to_string_pretty(&report)?;
            if let Some(out) = &args.out {
                std::fs::write(out, &json).with_context(|| format!("writing {}", out.display()))?;
            }
            outln!("{json}");
            Ok(())
        }
        BenchCommand::Serve(args) => super::serve::bench(args),
    }
}
