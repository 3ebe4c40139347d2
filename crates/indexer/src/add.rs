//! `twotower index add`: cold start without retraining. New items are embedded by the item
//! tower (content only, so a never-seen item gets a meaningful vector at once), and a new
//! version is published holding the old items plus the new ones, in the already trained index.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use features::{Embeddings, Item, TableReader, TableWriter};
use tch::Device;
use towers::LoadedModel;

use crate::embed::embed_batch;
use crate::error::{Error, Result};
use crate::manifest::{Manifest, StageSeconds};
use crate::publish::{publish_version, IndexPlan, PublishSettings, Staged};
use crate::root::{new_version, IndexRoot, VersionLayout};
use crate::version::IndexVersion;

/// Inputs of `index add`.
#[derive(Debug, Clone)]
pub struct AddOptions {
    pub index: PathBuf,
    pub model: PathBuf,
    /// New or changed items (items table); ids already indexed are replaced.
    pub items: Option<PathBuf>,
    /// Text file of item ids to remove, one per line (`#` comments allowed).
    pub remove: Option<PathBuf>,
    pub batch_size: usize,
    pub device: Device,
    pub settings: PublishSettings,
}

/// The items of `--items`: a Parquet items table (`docs/data.md`) with at least one row, each
/// item checked as `prepare` checks the user's own files.
fn read_new_items(path: &Path) -> Result<Vec<Item>> {
    // By content, not by name: Parquet files start with `PAR1`.
    let mut magic = [0u8; 4];
    let is_parquet = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == b"PAR1");
    if !is_parquet && path.is_file() && std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
        return Err(Error::invalid(format!(
            "{}: index add reads a Parquet items table (`.parquet`, schema in docs/data.md), not this file type",
            path.display()
        )));
    }
    let items = features::read_table::<Item>(path)?;
    if items.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no items to add",
            path.display()
        )));
    }
    for (row, item) in items.iter().enumerate() {
        features::table::validate_item(item).map_err(|(column, reason)| {
            Error::invalid(format!(
                "{}: row {}: column `{column}`: {reason}",
                path.display(),
                row + 1
            ))
        })?;
    }
    Ok(items)
}

/// Publishes `CURRENT` plus the new items, minus the removed ones.
pub fn add_items(opts: &AddOptions) -> Result<Manifest> {
    if opts.items.is_none() && opts.remove.is_none() {
        return Err(Error::invalid("index add needs --items, --remove or both"));
    }
    // The lock first: a rebuild publishing between reading CURRENT and taking the lock would be
    // replaced by this version, built on the parent it read.
    let root = IndexRoot::new(&opts.index);
    let _lock = opts.index.is_dir().then(|| root.lock()).transpose()?;
    let current = IndexVersion::open_current(&opts.index)?;
    let model = LoadedModel::load(&opts.model, opts.device)?;
    if model.info.weights_sha256 != current.manifest.model.weights_sha256 {
        return Err(Error::invalid(format!(
            "index version {} was embedded with model {}, but {} is model {}: adding would mix vector spaces; rebuild with `twotower index`",
            current.version,
            current.manifest.model.version,
            opts.model.display(),
            model.info.version
        )));
    }
    let vocabs = model.vocabularies()?;
    let new_items = match &opts.items {
        Some(path) => read_new_items(path)?,
        None => Vec::new(),
    };
    let mut new_ids = HashSet::new();
    for (row, item) in new_items.iter().enumerate() {
        if !new_ids.insert(item.item_id) {
            return Err(Error::invalid(format!(
                "{}: row {}: duplicate item id {}",
                opts.items.as_deref().unwrap_or(Path::new("")).display(),
                row + 1,
                item.item_id
            )));
        }
    }
    let removed = match &opts.remove {
        Some(path) => read_ids(path)?,
        None => HashSet::new(),
    };
    if let Some(id) = new_ids.intersection(&removed).next() {
        return Err(Error::invalid(format!(
            "item {id} is both in --items and in --remove: say which you mean"
        )));
    }
    let dropped = |id: &u64| new_ids.contains(id) || removed.contains(id);

    let version = new_version(&current.version);
    let staging = root.stage(&version)?;
    let dir = staging.path().to_path_buf();
    let start = Instant::now();
    let mut items = TableWriter::<Item>::create(&VersionLayout(dir.clone()).items())?;
    for batch in TableReader::<Item>::open(&current.items_path())? {
        let kept: Vec<Item> = batch?
            .into_iter()
            .filter(|i| !dropped(&i.item_id))
            .collect();
        items.write(&kept)?;
    }
    items.write(&new_items)?;
    items.finish()?;
    let mut embeddings = Embeddings::new(current.embeddings.dim);
    for r in 0..current.embeddings.len() {
        let id = current.embeddings.ids[r];
        if !dropped(&id) {
            embeddings.push(id, current.embeddings.vector(r));
        }
    }
    for chunk in new_items.chunks(opts.batch_size.max(1)) {
        embed_batch(chunk, &model.model, &vocabs, &mut embeddings)?;
    }
    let seconds = StageSeconds {
        embed: start.elapsed().as_secs_f64(),
        ..Default::default()
    };
    tracing::info!(
        added = new_items.len(),
        removed = current.embeddings.len() + new_items.len() - embeddings.len(),
        total = embeddings.len(),
        "merged the new items into the catalog"
    );
    let parent = current.version.clone();
    let source = opts.items.clone().unwrap_or_else(|| current.items_path());
    publish_version(
        Staged {
            root: &root,
            version,
            dir,
            embeddings,
            source,
            model: &model,
            parent: Some(parent),
            valid_examples: None,
            vocabs: &vocabs,
            seconds,
        },
        IndexPlan::Reuse(current.index),
        &opts.settings,
    )
}

fn read_ids(path: &Path) -> Result<HashSet<u64>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut ids = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let id = line.parse::<u64>().map_err(|_| Error::BadFile {
            path: path.to_path_buf(),
            reason: format!("line {}: `{line}` is not an item id", n + 1),
        })?;
        ids.insert(id);
    }
    Ok(ids)
}
