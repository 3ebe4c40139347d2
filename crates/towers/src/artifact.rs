//! What `twotower train` leaves in `MODEL_DIR`, and how later stages read it back.
//!
//! - `model.safetensors`: the weights (tensor names in `docs/architecture.md`);
//! - `model.json`: architecture, training settings, and the checksums of the vocabularies and of
//!   `dataset.json` it was trained on, so indexer and server can refuse mismatched inputs;
//! - `metrics.json`, `train_log.jsonl`, `training_curves.png`.

use std::path::{Path, PathBuf};

use crate::cobuyers::{RerankInfo, Reranker};
use crate::{TowerConfig, TwoTower};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::error::{Error, Result};

/// Identifies the file format of `model.json`.
pub const MODEL_FORMAT: &str = "twotower-model/1";

/// `model.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub format: String,
    /// Short content hash of the weights: the model's version string.
    pub version: String,
    pub tower: TowerConfig,
    /// The training settings (the trainer's `TrainConfig`), kept opaque here so that indexer
    /// and server need not depend on the trainer.
    pub train: serde_json::Value,
    /// Checksum of the `vocab/` the model was trained with.
    pub vocab_checksum: String,
    /// sha256 of the `dataset.json` the model was trained on.
    pub dataset_checksum: String,
    /// Name of the weights file, relative to `model.json`.
    pub weights: String,
    /// sha256 of the weights file.
    pub weights_sha256: String,
    /// Device the model was trained on.
    pub device: String,
    /// The second stage, when training chose one (`cobuyers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank: Option<RerankInfo>,
}

/// Paths inside a model directory.
pub struct ModelLayout(pub PathBuf);

impl ModelLayout {
    pub fn info(&self) -> PathBuf {
        self.0.join("model.json")
    }
    pub fn weights(&self) -> PathBuf {
        self.0.join("model.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.0.join("metrics.json")
    }
    pub fn train_log(&self) -> PathBuf {
        self.0.join("train_log.jsonl")
    }
    pub fn curves(&self) -> PathBuf {
        self.0.join("training_curves.png")
    }
    /// Copy of the vocabularies the model was trained with (same files as `DATA_DIR/vocab`).
    pub fn vocab(&self) -> PathBuf {
        self.0.join("vocab")
    }
    /// The second stage's co-buyer lists ([`crate::cobuyers`]).
    pub fn cobuyers(&self) -> PathBuf {
        self.0.join("cobuyers.safetensors")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint")
    }
}

/// A trained model loaded from its directory, with its description.
pub struct LoadedModel {
    pub info: ModelInfo,
    pub model: TwoTower,
    pub dir: PathBuf,
}

impl LoadedModel {
    /// Loads `MODEL_DIR`, checking the weights against the checksum in `model.json`.
    pub fn load(dir: &Path, device: Device) -> Result<LoadedModel> {
        let layout = ModelLayout(dir.to_path_buf());
        let info_path = layout.info();
        let bytes = std::fs::read(&info_path).map_err(|e| Error::io(&info_path, e))?;
        let info: ModelInfo = serde_json::from_slice(&bytes).map_err(|e| Error::ModelFile {
            path: info_path.clone(),
            reason: format!("invalid model.json: {e}"),
        })?;
        if info.format != MODEL_FORMAT {
            return Err(Error::ModelFile {
                path: info_path,
                reason: format!("format `{}`, expected `{MODEL_FORMAT}`", info.format),
            });
        }
        let weights = dir.join(&info.weights);
        check_sha256(&weights, &info.weights_sha256)?;
        let model = TwoTower::load(info.tower.clone(), &weights, device)?;
        Ok(LoadedModel {
            info,
            model,
            dir: dir.to_path_buf(),
        })
    }

    /// The second stage `model.json` names, loaded and checked; `None` when there is none.
    pub fn reranker(&self) -> Result<Option<Reranker>> {
        self.info
            .rerank
            .as_ref()
            .map(|info| Reranker::load(&self.dir, info))
            .transpose()
    }

    /// The vocabularies in `MODEL_DIR/vocab`, checked against `model.json`.
    pub fn vocabularies(&self) -> Result<features::Vocabularies> {
        let dir = ModelLayout(self.dir.clone()).vocab();
        if !dir.is_dir() {
            return Err(Error::ModelFile {
                path: dir,
                reason: "missing: the model directory has no copy of its vocabularies (retrain with this version)".into(),
            });
        }
        let (vocabs, checksum) = features::Vocabularies::load(&dir)?;
        if checksum != self.info.vocab_checksum {
            return Err(Error::ModelFile {
                path: dir,
                reason: format!(
                    "vocabulary checksum {} differs from model.json's {}",
                    short(&checksum),
                    short(&self.info.vocab_checksum)
                ),
            });
        }
        Ok(vocabs)
    }

    /// Refuses data whose vocabularies differ from the model's.
    pub fn check_vocab(&self, data_dir: &Path, vocab_checksum: &str) -> Result<()> {
        if vocab_checksum != self.info.vocab_checksum {
            return Err(Error::Mismatch(format!(
                "vocabulary mismatch: {} was trained with vocabulary {}, but {} has {}; train a model on this data or use the data it was trained on",
                self.dir.display(),
                short(&self.info.vocab_checksum),
                data_dir.display(),
                short(vocab_checksum)
            )));
        }
        Ok(())
    }
}

/// Refuses a file of the model directory whose sha256 is not the one `model.json` recorded.
pub(crate) fn check_sha256(path: &Path, expected: &str) -> Result<()> {
    let sum = features::fsutil::sha256_file(path)?;
    if sum != expected {
        return Err(Error::ModelFile {
            path: path.to_path_buf(),
            reason: format!(
                "sha256 {sum} does not match model.json ({expected}): corrupt or replaced"
            ),
        });
    }
    Ok(())
}

pub fn short(checksum: &str) -> &str {
    &checksum[..checksum.len().min(12)]
}

/// Copies a vocabulary directory to `dest`, replacing what is there: files go to a hidden
/// sibling first, which is then renamed into place.
pub fn copy_vocab(src: &Path, dest: &Path) -> Result<()> {
    let tmp = features::fsutil::hidden_sibling(dest, "tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let entries = std::fs::read_dir(src).map_err(|e| Error::io(src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let to = tmp.join(entry.file_name());
        std::fs::copy(entry.path(), &to).map_err(|e| Error::io(&to, e))?;
        std::fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&to, e))?;
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    }
    std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))?;
    features::fsutil::sync_parent(dest).map_err(Error::from)
}
