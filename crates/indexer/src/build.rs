//! `twotower index`: embed a prepared catalog and publish a new index version, in one job or
//! as `--shard i/n` jobs whose outputs `twotower index merge` turns into one version.

use std::path::{Path, PathBuf};
use std::time::Instant;

use features::layout::{DataLayout, DatasetInfo};
use features::splits::Split;
use features::{Embeddings, Item, Progress, TableReader, TableWriter};
use serde::{Deserialize, Serialize};
use tch::Device;
use towers::LoadedModel;

use crate::embed::{embed_items, Shard};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, ModelRef, StageSeconds};
use crate::publish::{publish_version, IndexPlan, PublishSettings, Staged};
use crate::root::{new_version, IndexRoot, VersionLayout};

/// Inputs of a full build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Prepared dataset (`items.parquet`, `dataset.json`, validation examples).
    pub data: PathBuf,
    pub model: PathBuf,
    /// `INDEX_ROOT` for a build; the shard's output directory with `shard`.
    pub out: PathBuf,
    pub batch_size: usize,
    pub device: Device,
    /// Embed one shard only (no index; see [`merge_shards`]).
    pub shard: Option<Shard>,
    pub settings: PublishSettings,
}

/// `shard.json`: what one shard job produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardInfo {
    pub shard: String,
    pub count: usize,
    pub model: ModelRef,
    /// Path of the dataset the items came from.
    pub data: String,
    pub embed_seconds: f64,
}

/// Loads the model and checks that it was trained on this dataset's vocabularies.
fn load_model_for(data: &Path, model: &Path, device: Device) -> Result<LoadedModel> {
    let info = DatasetInfo::load(data)?;
    let loaded = LoadedModel::load(model, device)?;
    loaded.check_vocab(data, &info.vocab_checksum)?;
    Ok(loaded)
}

/// Embeds the whole catalog and publishes a new version under `opts.out`.
pub fn build_index(opts: &BuildOptions, progress: &dyn Progress) -> Result<Manifest> {
    if opts.shard.is_some() {
        return Err(Error::invalid("build_index with a shard: use embed_shard"));
    }
    let model = load_model_for(&opts.data, &opts.model, opts.device)?;
    let vocabs = model.vocabularies()?;
    let root = IndexRoot::new(&opts.out);
    let version = new_version(&model.info.weights_sha256);
    let _lock = root.lock()?;
    let staging = root.stage(&version)?;
    let dir = staging.path().to_path_buf();
    let layout = DataLayout(opts.data.clone());

    let start = Instant::now();
    let mut items = TableWriter::<Item>::create(&VersionLayout(dir.clone()).items())?;
    let embeddings = embed_items(
        &layout.items(),
        &model.model,
        &vocabs,
        opts.batch_size,
        None,
        Some(&mut items),
        progress,
    )?;
    items.finish()?;
    let seconds = StageSeconds {
        embed: start.elapsed().as_secs_f64(),
        ..Default::default()
    };
    tracing::info!(
        items = embeddings.len(),
        seconds = seconds.embed,
        "embedded the catalog"
    );
    opts.settings.checkpoint("embed")?;
    publish_version(
        Staged {
            root: &root,
            version,
            dir,
            embeddings,
            source: layout.items(),
            model: &model,
            parent: None,
            valid_examples: Some(layout.split(Split::Valid)),
            vocabs: &vocabs,
            seconds,
        },
        IndexPlan::Fresh,
        &opts.settings,
    )
}

/// Embeds one shard of the catalog into `opts.out` (`embeddings.parquet`, `items.parquet`,
/// `shard.json`), for [`merge_shards`].
pub fn embed_shard(opts: &BuildOptions, progress: &dyn Progress) -> Result<ShardInfo> {
    let shard = opts
        .shard
        .ok_or_else(|| Error::invalid("embed_shard needs a shard"))?;
    let model = load_model_for(&opts.data, &opts.model, opts.device)?;
    let vocabs = model.vocabularies()?;
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    // shard.json marks a complete shard: remove an old one before rewriting its files.
    let out = VersionLayout(opts.out.clone());
    let marker = out.shard_info();
    if marker.exists() {
        std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
    }
    let layout = DataLayout(opts.data.clone());
    let start = Instant::now();
    let mut items = TableWriter::<Item>::create(&out.items())?;
    let embeddings = embed_items(
        &layout.items(),
        &model.model,
        &vocabs,
        opts.batch_size,
        Some(shard),
        Some(&mut items),
        progress,
    )?;
    items.finish()?;
    embeddings.write(&out.embeddings())?;
    let info = ShardInfo {
        shard: shard.to_string(),
        count: embeddings.len(),
        model: ModelRef::of(&model),
        data: opts.data.display().to_string(),
        embed_seconds: start.elapsed().as_secs_f64(),
    };
    // shard.json last: its presence means the shard is complete.
    features::fsutil::write_json(&out.shard_info(), &info)?;
    Ok(info)
}

/// Inputs of `twotower index merge`.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Output directories of the shard jobs, all of the same `n`.
    pub shards: Vec<PathBuf>,
    pub data: PathBuf,
    pub model: PathBuf,
    pub out: PathBuf,
    pub device: Device,
    pub settings: PublishSettings,
}

/// Builds one index version from the outputs of every shard of an embedding job.
pub fn merge_shards(opts: &MergeOptions, _progress: &dyn Progress) -> Result<Manifest> {
    let model = load_model_for(&opts.data, &opts.model, opts.device)?;
    let vocabs = model.vocabularies()?;
    let mut seen = std::collections::BTreeSet::new();
    let mut expected = None;
    let mut embed_seconds: f64 = 0.0;
    let root = IndexRoot::new(&opts.out);
    let version = new_version(&model.info.weights_sha256);
    let _lock = root.lock()?;
    let staging = root.stage(&version)?;
    let dir = staging.path().to_path_buf();
    let mut items = TableWriter::<Item>::create(&VersionLayout(dir.clone()).items())?;
    let mut all: Option<Embeddings> = None;
    for shard_dir in &opts.shards {
        let shard_files = VersionLayout(shard_dir.clone());
        let path = shard_files.shard_info();
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let info: ShardInfo = serde_json::from_slice(&bytes).map_err(|e| Error::BadFile {
            path: path.clone(),
            reason: format!("not a shard description: {e}"),
        })?;
        if info.model.weights_sha256 != model.info.weights_sha256 {
            return Err(Error::invalid(format!(
                "{}: embedded with model {}, merging with model {}",
                shard_dir.display(),
                info.model.version,
                model.info.version
            )));
        }
        let shard: Shard = info.shard.parse()?;
        if *expected.get_or_insert(shard.count) != shard.count || !seen.insert(shard.index) {
            return Err(Error::invalid(format!(
                "{}: shard {} does not fit the other shards (duplicate or different n)",
                shard_dir.display(),
                info.shard
            )));
        }
        embed_seconds = embed_seconds.max(info.embed_seconds);
        let e = Embeddings::read(&shard_files.embeddings())?;
        if e.len() != info.count {
            return Err(Error::invalid(format!(
                "{}: shard.json says {} items, embeddings.parquet holds {}: rerun this shard",
                shard_dir.display(),
                info.count,
                e.len()
            )));
        }
        match &mut all {
            None => all = Some(e),
            Some(a) => a.extend(&e),
        }
        for batch in TableReader::<Item>::open(&shard_files.items())? {
            items.write(&batch?)?;
        }
    }
    let n = expected.unwrap_or(0);
    if seen.len() != n || n == 0 {
        let missing: Vec<_> = (0..n)
            .filter(|i| !seen.contains(i))
            .map(|i| format!("{i}/{n}"))
            .collect();
        return Err(Error::invalid(format!(
            "merge needs every shard; missing {}",
            if missing.is_empty() {
                "all of them".into()
            } else {
                missing.join(", ")
            }
        )));
    }
    items.finish()?;
    let layout = DataLayout(opts.data.clone());
    publish_version(
        Staged {
            root: &root,
            version,
            dir,
            embeddings: all.unwrap_or_default(),
            source: opts.shards[0]
                .parent()
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            model: &model,
            parent: None,
            valid_examples: Some(layout.split(Split::Valid)),
            vocabs: &vocabs,
            seconds: StageSeconds {
                embed: embed_seconds,
                ..Default::default()
            },
        },
        IndexPlan::Fresh,
        &opts.settings,
    )
}
