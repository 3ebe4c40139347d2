//! `twotower`: the command-line entry point to every stage of the recommender.
//!
//! This crate parses arguments, sets up logging and progress display, and calls the library
//! crates; it holds no logic of its own.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod omp;

/// Personalized two-tower recommendations: prepare data, train, index, serve.
#[derive(Debug, Parser)]
#[command(name = "twotower", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Turn a dataset (MovieLens, Complete Journey, synthetic or your own files) into DATA_DIR.
    Prepare,
    /// Train the two towers on DATA_DIR and write MODEL_DIR.
    Train,
    /// Evaluate a trained model by full ranking over the catalog.
    Eval,
    /// Embed the catalog and publish a versioned FAISS index.
    Index,
    /// Serve gRPC recommendations from a model and an index.
    Serve,
    /// Ask a running server for recommendations.
    Recommend,
    /// Run prepare, train and index from a pipeline file.
    Pipeline,
    /// Measure training, indexing or serving speed.
    Bench,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Prepare => "prepare",
            Command::Train => "train",
            Command::Eval => "eval",
            Command::Index => "index",
            Command::Serve => "serve",
            Command::Recommend => "recommend",
            Command::Pipeline => "pipeline",
            Command::Bench => "bench",
        }
    }
}

fn main() -> ExitCode {
    omp::ensure_passive_wait_policy();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result: anyhow::Result<()> = Err(anyhow::anyhow!(
        "`twotower {}` is not built yet",
        cli.command.name()
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
