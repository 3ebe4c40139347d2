//! `twotower`: the command-line entry point to every stage of the recommender.
//!
//! This crate parses arguments, sets up logging and progress display, and calls the library
//! crates; it holds no logic of its own.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Many small, short-lived allocations per request (protobuf messages, candidate lists, history
/// views) from several threads: glibc's malloc spent ~8% of the server's CPU on them under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `print!` that does not panic when stdout cannot be written (a full disk): the job goes on to
/// finish its work, and then exits with a failure that says its report was lost
/// ([`STDOUT_LOST`]). A closed pipe (`| head`) is no failure.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        $crate::note_stdout(write!(std::io::stdout(), $($arg)*));
    }};
}

/// `println!` that does not panic when stdout cannot be written ([`out!`]).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        $crate::note_stdout(writeln!(std::io::stdout(), $($arg)*));
    }};
}

/// `eprintln!` that does not panic when stderr cannot be written ([`out!`]).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Set when a report could not be written to stdout (other than into a closed pipe).
static STDOUT_LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn note_stdout(written: std::io::Result<()>) {
    if let Err(e) = written {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            STDOUT_LOST.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

mod commands;
mod omp;
mod pipeline;
mod progress;
mod rss;
mod settings;

/// Personalized two-tower recommendations: prepare data, train, index, serve.
///
/// The usual order is `prepare` → `train` → `index` → `serve`; `pipeline run` chains the batch
/// stages. Logs go to stderr (set RUST_LOG=debug for more), results to stdout.
#[derive(Debug, Parser)]
#[command(name = "twotower", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Turn a dataset (MovieLens, Complete Journey, synthetic or your own files) into DATA_DIR.
    Prepare(commands::prepare::PrepareArgs),
    /// Train the two towers on DATA_DIR and write MODEL_DIR.
    Train(commands::train::TrainArgs),
    /// Evaluate a trained model by full ranking over the catalog (JSON on stdout).
    Eval(commands::eval::EvalArgs),
    /// Embed the catalog and publish a versioned FAISS index (`index add`, `index merge`).
    Index(commands::index::IndexArgs),
    /// Serve gRPC recommendations from a model and an index (hot-reloads new index versions).
    Serve(commands::serve::ServeArgs),
    /// Ask a running server for recommendations (a table, or JSON with --json).
    Recommend(commands::recommend::RecommendArgs),
    /// Check that a running server is SERVING (exit status 0 if so).
    Health(commands::recommend::HealthArgs),
    /// Run prepare, train and index from a pipeline file, skipping stages that are up to date.
    Pipeline(commands::pipeline::PipelineArgs),
    /// Measure training or serving speed.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn main() -> ExitCode {
    omp::ensure_thread_environment();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // A log that cannot be written (stderr on a full disk) must not end the job: the
        // subscriber would report it with `eprintln!`, which panics then.
        .log_internal_errors(false)
        .init();
    let result = match cli.command {
        Command::Prepare(args) => commands::prepare::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Index(args) => commands::index::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Recommend(args) => commands::recommend::run(args),
        Command::Health(args) => commands::recommend::health(args),
        Command::Pipeline(args) => commands::pipeline::run(args),
        Command::Bench(cmd) => commands::bench::run(cmd),
    };
    let flushed = std::io::Write::flush(&mut std::io::stdout());
    note_stdout(flushed);
    match result {
        Ok(()) if STDOUT_LOST.load(std::sync::atomic::Ordering::Relaxed) => {
            errln!("error: the work is done, but its report could not be written to stdout");
            ExitCode::FAILURE
        }
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            errln!("error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, as `{:#}` prints them, less each cause that the message before it
/// already ends with: the library errors print their source in their own message (so that a
/// log line without the chain still says it), which `{:#}` would repeat.
fn error_chain(err: &anyhow::Error) -> String {
    let mut out = err.to_string();
    let mut previous = out.clone();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !previous.ends_with(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
        previous = cause;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_is_not_printed_twice() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let err = anyhow::Error::new(features::error::Error::io("items.csv", io));
        assert_eq!(error_chain(&err), "items.csv: No such file or directory");
        let err = err.context("reading the items");
        assert_eq!(
            error_chain(&err),
            "reading the items: items.csv: No such file or directory"
        );
        let err = anyhow::anyhow!("outer").context("context");
        assert_eq!(error_chain(&err), "context: outer");
    }
}
