//! `twotower index`: embed the catalog and publish a versioned FAISS index; `index add` for new
//! items without retraining; `index merge` for sharded embedding jobs.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use indexer::{AddOptions, BuildOptions, MergeOptions, PublishSettings, Shard};

use crate::progress::Bars;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct IndexArgs {
    #[command(subcommand)]
    command: Option<IndexCommand>,
    #[command(flatten)]
    build: BuildArgs,
}

#[derive(Debug, Subcommand)]
enum IndexCommand {
    /// Add (or replace) items in the current version without retraining, or remove items;
    /// publishes a new version.
    Add(AddArgs),
    /// Build one version from the outputs of `twotower index --shard i/n` jobs.
    Merge(MergeArgs),
}

/// Settings of the published index.
#[derive(Debug, Clone, Args, serde::Deserialize)]
#[serde(default)]
pub struct PublishArgs {
    /// FAISS factory string, e.g. `IVF4096,Flat`, `IVF4096,SQ8`, `IVF4096,PQ32np`, `HNSW32`.
    /// Default: `IVF{nlist},Flat` with nlist ≈ 4·√(items).
    #[arg(long)]
    factory: Option<String>,
    /// Default nprobe saved with the index. Default: the smallest measured nprobe whose
    /// recall@100 against exact search is at least 0.95.
    #[arg(long)]
    nprobe: Option<usize>,
    /// Fetch N·k candidates and re-score them with the exact item vectors: for compressed codes
    /// (`SQ8`, `PQ…x4fs`), whose scan is cheaper but blurs close scores. Recall is measured with
    /// it. Default: 1 (none); `index add` keeps the current version's.
    #[arg(long)]
    rerank: Option<usize>,
    /// Versions to keep in INDEX_ROOT (the current one is never deleted).
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Seed of the quantizer's training sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Vectors per IVF list the quantizer trains on (a sample of the catalog; FAISS advises 39
    /// to 256). Training time grows linearly with it.
    #[arg(long, default_value_t = indexer::DEFAULT_TRAIN_PER_CENTROID)]
    train_per_centroid: usize,
    /// auto (CUDA when libtorch sees a GPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl Default for PublishArgs {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl PublishArgs {
    fn settings(&self) -> anyhow::Result<PublishSettings> {
        if self.nprobe == Some(0) {
            anyhow::bail!("--nprobe must be at least 1");
        }
        if self.rerank == Some(0) {
            anyhow::bail!("--rerank must be at least 1");
        }
        if self.train_per_centroid == 0 {
            anyhow::bail!("--train-per-centroid must be at least 1");
        }
        if self.keep == 0 {
            anyhow::bail!("--keep must be at least 1 (the current version is always kept)");
        }
        Ok(PublishSettings {
            train_per_centroid: self.train_per_centroid,
            factory: self.factory.clone(),
            nprobe: self.nprobe,
            rerank: self.rerank,
            keep: self.keep,
            seed: self.seed,
            ..PublishSettings::default()
        })
    }
}

#[derive(Debug, Args)]
struct BuildArgs {
    /// A prepared dataset: its items.parquet is embedded, its validation examples measure recall.
    #[arg(long)]
    data: Option<PathBuf>,
    /// A trained model directory (from `twotower train`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// INDEX_ROOT; with --shard, the shard's own output directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Embed only row groups g with g % n == i (writes embeddings, not an index; see `index merge`).
    #[arg(long)]
    shard: Option<String>,
    #[command(flatten)]
    settings: IndexSettings,
}

/// How to build an index: the flags of `twotower index`, or a pipeline's `[index]` table.
#[derive(Debug, Clone, Args, serde::Deserialize)]
#[serde(default)]
pub struct IndexSettings {
    /// Items per item-tower batch.
    #[arg(long, default_value_t = 4096)]
    pub batch_size: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub publish: PublishArgs,
}

impl Default for IndexSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

#[derive(Debug, Args)]
struct AddArgs {
    /// New or changed items (an items table, Parquet); ids already indexed are replaced.
    #[arg(long)]
    items: Option<PathBuf>,
    /// Text file of item ids to remove, one per line.
    #[arg(long)]
    remove: Option<PathBuf>,
    /// The model the current version was built with.
    #[arg(long)]
    model: PathBuf,
    /// INDEX_ROOT.
    #[arg(long)]
    index: PathBuf,
    #[arg(long, default_value_t = 4096)]
    batch_size: usize,
    #[command(flatten)]
    publish: PublishArgs,
}

#[derive(Debug, Args)]
struct MergeArgs {
    /// Output directories of every shard job.
    #[arg(long, num_args = 1.., required = true)]
    shards: Vec<PathBuf>,
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    model: PathBuf,
    /// INDEX_ROOT.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    publish: PublishArgs,
}

pub fn run(args: IndexArgs) -> anyhow::Result<()> {
    if let Some(manifest) = execute(args)? {
        outln!("{}", serde_json::to_string_pretty(&manifest)?);
    }
    Ok(())
}

/// Runs the job, reports it on stderr, and returns the published manifest (`None` for a shard
/// job, whose description it prints).
pub fn execute(args: IndexArgs) -> anyhow::Result<Option<indexer::Manifest>> {
    let manifest = match args.command {
        Some(IndexCommand::Add(a)) => {
            if a.publish.factory.is_some() {
                anyhow::bail!("`index add` keeps the current version's trained index: --factory applies to `twotower index` only");
            }
            let opts = AddOptions {
                index: a.index.clone(),
                model: a.model.clone(),
                items: a.items.clone(),
                remove: a.remove.clone(),
                batch_size: a.batch_size,
                device: super::device(&a.publish.device)?,
                settings: a.publish.settings()?,
            };
            indexer::add_items(&opts)
                .with_context(|| format!("adding items to the index in {}", a.index.display()))?
        }
        Some(IndexCommand::Merge(m)) => {
            let opts = MergeOptions {
                shards: m.shards.clone(),
                data: m.data.clone(),
                model: m.model.clone(),
                out: m.out.clone(),
                device: super::device(&m.publish.device)?,
                settings: m.publish.settings()?,
            };
            indexer::merge_shards(&opts, &Bars::new())
                .with_context(|| format!("merging shards into {}", m.out.display()))?
        }
        None => {
            let b = args.build;
            let need = |v: Option<PathBuf>, flag: &str| {
                v.with_context(|| format!("`twotower index` needs --{flag}"))
            };
            let mut opts = build_options(
                &b.settings,
                need(b.data, "data")?,
                need(b.model, "model")?,
                need(b.out, "out")?,
            )?;
            opts.shard = b.shard.as_deref().map(str::parse::<Shard>).transpose()?;
            if opts.shard.is_some() {
                let info = indexer::embed_shard(&opts, &Bars::new())
                    .with_context(|| format!("embedding shard into {}", opts.out.display()))?;
                outln!("{}", serde_json::to_string_pretty(&info)?);
                return Ok(None);
            }
            build(&opts)?
        }
    };
    report(&manifest);
    Ok(Some(manifest))
}

/// The job that builds one index of the whole catalog into `out`.
pub fn build_options(
    settings: &IndexSettings,
    data: PathBuf,
    model: PathBuf,
    out: PathBuf,
) -> anyhow::Result<BuildOptions> {
    Ok(BuildOptions {
        data,
        model,
        out,
        batch_size: settings.batch_size,
        device: super::device(&settings.publish.device)?,
        shard: None,
        settings: settings.publish.settings()?,
    })
}

/// Embeds the catalog and publishes a version.
pub fn build(opts: &BuildOptions) -> anyhow::Result<indexer::Manifest> {
    indexer::build_index(opts, &Bars::new())
        .with_context(|| format!("building the index in {}", opts.out.display()))
}

/// The one-line summary of a published version, on stderr.
pub fn report(manifest: &indexer::Manifest) {
    errln!(
        "published index version {} ({} items, {}, nprobe {}, recall@10 {:.3} and recall@100 {:.3} vs exact; peak RSS {:.0} MiB)",
        manifest.version,
        manifest.count,
        manifest.factory,
        manifest.nprobe.map_or("-".into(), |n| n.to_string()),
        manifest.recall_at_10_vs_exact,
        manifest.recall_at_100_vs_exact,
        crate::rss::peak_rss_mib().unwrap_or(f64::NAN)
    );
}
