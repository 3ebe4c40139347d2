//! `twotower pipeline run`: the batch stages of one pipeline file, skipping what is up to date.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::pipeline::{self, file::PipelineFile, Workdir};

#[derive(Debug, Args)]
pub struct PipelineArgs {
    #[command(subcommand)]
    command: PipelineCommand,
}

#[derive(Debug, Subcommand)]
enum PipelineCommand {
    /// Run prepare, train and index from FILE (e.g. pipelines/ml-100k.toml) into --workdir.
    Run(RunArgs),
    /// Serve the pipeline's model and index with the flags of its [serve] table.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The pipeline file.
    file: PathBuf,
    /// The --workdir of `pipeline run`.
    #[arg(long)]
    workdir: PathBuf,
    /// More `twotower serve` flags, after `--` (they override the [serve] table), e.g.
    /// `-- --addr 127.0.0.1:50052`.
    #[arg(last = true)]
    serve_flags: Vec<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The pipeline file.
    file: PathBuf,
    /// Where data, model and index go.
    #[arg(long)]
    workdir: PathBuf,
    /// Rerun this stage and every later one, even if up to date.
    #[arg(long, value_enum)]
    force: Option<pipeline::Stage>,
    /// Device for training and embedding: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(args: PipelineArgs) -> anyhow::Result<()> {
    let a = match args.command {
        PipelineCommand::Run(a) => a,
        PipelineCommand::Serve(s) => {
            let file = PipelineFile::load(&s.file)?;
            return pipeline::serve(&file, &s.workdir, &s.serve_flags);
        }
    };
    let file = PipelineFile::load(&a.file)?;
    let outcomes = pipeline::run(&file, &a.workdir, a.force, &a.device)?;
    let dirs = Workdir(a.workdir.clone());
    outln!();
    outln!("pipeline {} in {}", a.file.display(), a.workdir.display());
    for o in &outcomes {
        if o.ran {
            outln!("  {:<8} ran in {:>7.1} s", o.stage, o.seconds);
        } else {
            outln!("  {:<8} up to date (skipped)", o.stage);
        }
    }
    let metrics = dirs.model().join("metrics.json");
    let report: trainer::TrainReport = serde_json::from_slice(
        &std::fs::read(&metrics).with_context(|| format!("reading {}", metrics.display()))?,
    )
    .with_context(|| format!("reading {}", metrics.display()))?;
    outln!();
    super::train::print_metrics(&report);
    let index = indexer::IndexVersion::open_current(&dirs.index())
        .with_context(|| format!("opening {}", dirs.index().display()))?;
    let m = &index.manifest;
    outln!();
    outln!("artifacts:");
    outln!("  data   {}", dirs.data().display());
    outln!(
        "  model  {} (version {})",
        dirs.model().display(),
        m.model.version
    );
    outln!(
        "  index  {} (version {}, {} items, {}, nprobe {}, recall@100 {:.3} vs exact)",
        dirs.index().display(),
        m.version,
        m.count,
        m.factory,
        m.nprobe.map_or("-".into(), |n| n.to_string()),
        m.recall_at_100_vs_exact
    );
    Ok(())
}
