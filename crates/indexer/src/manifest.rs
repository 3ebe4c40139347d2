//! `manifest.json`: what an index version holds, which model made it, and how good it is.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Identifies the file format of `manifest.json`.
pub const MANIFEST_FORMAT: &str = "twotower-index/1";

/// The model an index was embedded with: the server refuses to pair the index with another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Short weights hash (`model.json`'s `version`).
    pub version: String,
    pub weights_sha256: String,
    /// Checksum of the vocabularies the items were tokenized with.
    pub vocab_checksum: String,
    /// Where `model.json` was when the index was built (informational).
    pub model_json: String,
}

impl ModelRef {
    /// The reference to a loaded model, with the absolute path of its `model.json`.
    pub fn of(model: &towers::LoadedModel) -> ModelRef {
        let json = model.dir.join("model.json");
        ModelRef {
            version: model.info.version.clone(),
            weights_sha256: model.info.weights_sha256.clone(),
            vocab_checksum: model.info.vocab_checksum.clone(),
            model_json: std::path::absolute(&json)
                .unwrap_or(json)
                .display()
                .to_string(),
        }
    }
}

/// Recall of the index against exact inner-product search on a query sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NprobeRecall {
    pub nprobe: usize,
    pub recall_at_10: f64,
    pub recall_at_100: f64,
}

/// Wall-clock seconds of each build stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageSeconds {
    pub embed: f64,
    pub train: f64,
    pub add: f64,
    pub measure: f64,
    pub write: f64,
}

/// `INDEX_ROOT/<version>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The version this one was derived from by `index add` (None for a full build).
    pub parent: Option<String>,
    pub model: ModelRef,
    pub dim: usize,
    /// Always `inner_product`: scores are dot products of unit vectors.
    pub metric: String,
    /// Items in the index.
    pub count: usize,
    pub factory: String,
    pub nlist: Option<usize>,
    /// Default nprobe: the smallest measured one reaching recall@100 ≥ 0.95, unless overridden.
    pub nprobe: Option<usize>,
    /// Candidates fetched per wanted result and re-scored with the exact vectors
    /// (`indexer::rerank`); 1 means none. Recall figures include it.
    #[serde(default = "no_rerank")]
    pub rerank: usize,
    /// Vectors the quantizer was trained on.
    pub train_vectors: usize,
    pub recall_at_10_vs_exact: f64,
    pub recall_at_100_vs_exact: f64,
    /// `users` (validation examples) or `items` (item vectors as queries).
    pub recall_queries: String,
    pub recall_query_count: usize,
    /// Recall at each nprobe tried.
    pub recall_by_nprobe: Vec<NprobeRecall>,
    pub seconds: StageSeconds,
    /// Size of `index.faiss` in bytes.
    pub index_bytes: u64,
}

fn no_rerank() -> usize {
    1
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::BadFile {
            path: path.to_path_buf(),
            reason: format!("invalid manifest: {e}"),
        })?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::BadFile {
                path: path.to_path_buf(),
                reason: format!("format `{}`, expected `{MANIFEST_FORMAT}`", m.format),
            });
        }
        Ok(m)
    }

    /// Writes the manifest (inside a staging directory; publishing makes it visible).
    pub fn write(&self, path: &Path) -> Result<()> {
        features::fsutil::write_json(path, self).map_err(Error::from)
    }
}
