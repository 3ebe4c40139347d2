//! What one request is served from: a model and an index version that belong together.
//!
//! A [`Snapshot`] is immutable and shared through an `Arc`. Hot reload builds a new one and swaps
//! it in; requests that already hold the old one finish on it, and it is freed when the last
//! of them is done.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use features::Vocabularies;
use indexer::IndexVersion;
use tch::Device;
use towers::{LoadedModel, ModelInfo, Reranker, TwoTower};

use crate::catalog::ItemCatalog;
use crate::error::{Error, Result};

/// A loaded model: one copy of the weights per user-tower worker. `TwoTower` holds libtorch
/// tensors, which may move between threads but not be shared, so each worker owns a copy (the
/// mutex is never contended: worker `i` only ever locks copy `i`).
pub struct ModelSlot {
    pub info: ModelInfo,
    pub vocabs: Vocabularies,
    pub copies: Vec<Mutex<TwoTower>>,
    pub device: Device,
    /// Bytes of `model.json` this was loaded from (what the reload watcher compares).
    pub model_json: Vec<u8>,
    /// The second stage, when the model has one (`towers::cobuyers`).
    pub reranker: Option<Reranker>,
}

impl ModelSlot {
    /// Loads `MODEL_DIR` (weights checked against `model.json`) with `copies` copies.
    pub fn load(dir: &Path, copies: usize, device: Device) -> Result<ModelSlot> {
        let json_path = towers::ModelLayout(dir.to_path_buf()).info();
        let model_json = std::fs::read(&json_path).map_err(|e| Error::io(&json_path, e))?;
        let loaded = LoadedModel::load(dir, device)?;
        let vocabs = loaded.vocabularies()?;
        let reranker = loaded.reranker()?;
        let LoadedModel { info, model, .. } = loaded;
        let mut all = Vec::with_capacity(copies.max(1));
        for _ in 1..copies.max(1) {
            let mut copy = TwoTower::new(info.tower.clone(), device)?;
            tch::no_grad(|| copy.vs.copy(&model.vs))?;
            all.push(Mutex::new(copy));
        }
        all.push(Mutex::new(model));
        Ok(ModelSlot {
            info,
            vocabs,
            copies: all,
            device,
            model_json,
            reranker,
        })
    }
}

/// A loaded index version and its item metadata.
pub struct IndexSlot {
    pub version: IndexVersion,
    pub catalog: ItemCatalog,
}

impl IndexSlot {
    /// Loads the version `CURRENT` names (or `version`), with popularity from `counts`.
    pub fn load(
        root: &Path,
        version: Option<&str>,
        counts: &HashMap<u64, u64>,
    ) -> Result<IndexSlot> {
        let version = match version {
            Some(v) => IndexVersion::open(root, v)?,
            None => IndexVersion::open_current(root)?,
        };
        let catalog = ItemCatalog::load(&version.items_path(), &version.row_of, counts)?;
        Ok(IndexSlot { version, catalog })
    }
}

/// A model and an index that were checked to belong together.
pub struct Snapshot {
    pub model: Arc<ModelSlot>,
    pub index: Arc<IndexSlot>,
}

impl Snapshot {
    /// Pairs a model with an index after checking them: the index was embedded with exactly these
    /// weights and vocabularies, dimensions agree, and a probe search answers.
    pub fn pair(model: Arc<ModelSlot>, index: Arc<IndexSlot>) -> Result<Snapshot> {
        let m = &model.info;
        let v = &index.version;
        let r = &v.manifest.model;
        if r.weights_sha256 != m.weights_sha256 {
            return Err(Error::Mismatch(format!(
                "index {} was embedded with model {} but the model directory holds {}; build an index with this model",
                v.version, r.version, m.version
            )));
        }
        if r.vocab_checksum != m.vocab_checksum {
            return Err(Error::Mismatch(format!(
                "index {} was tokenized with vocabulary {}, the model uses {}",
                v.version,
                towers::artifact::short(&r.vocab_checksum),
                towers::artifact::short(&m.vocab_checksum)
            )));
        }
        if v.manifest.dim as i64 != m.tower.dim || v.embeddings.dim as i64 != m.tower.dim {
            return Err(Error::Mismatch(format!(
                "index {} has dim {}, the model {}",
                v.version, v.manifest.dim, m.tower.dim
            )));
        }
        if !v.embeddings.is_empty() {
            let probe = v.embeddings.vector(0);
            let hits = v.index.search(probe, 1, None)?;
            if hits.of(0).next().is_none() {
                return Err(Error::Mismatch(format!(
                    "index {}: a probe query with an indexed item's own vector found nothing",
                    v.version
                )));
            }
        }
        Ok(Snapshot { model, index })
    }

    pub fn model_version(&self) -> &str {
        &self.model.info.version
    }

    pub fn index_version(&self) -> &str {
        &self.index.version.version
    }
}
