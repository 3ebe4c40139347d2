//! What a finished stage leaves in `WORKDIR/.pipeline/<stage>.json`: a checksum of everything
//! it read, so a rerun skips it only when nothing it depends on has changed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: String,
    /// sha256 over the stage's settings and input files.
    pub inputs: String,
    pub finished_at: String,
    pub seconds: f64,
}

/// Accumulates a stage's inputs into one checksum.
#[derive(Default)]
pub struct Inputs(Sha256);

impl Inputs {
    /// A named value (settings as canonical JSON, a checksum, a version).
    pub fn value(mut self, name: &str, value: &str) -> Self {
        self.0.update(name.as_bytes());
        self.0.update([0]);
        self.0.update(value.as_bytes());
        self.0.update([0]);
        self
    }

    /// A file's contents.
    pub fn file(self, name: &str, path: &Path) -> anyhow::Result<Self> {
        let sum = features::fsutil::sha256_file(path)?;
        Ok(self.value(name, &sum))
    }

    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

pub fn record_path(workdir: &Path, stage: &str) -> PathBuf {
    workdir.join(".pipeline").join(format!("{stage}.json"))
}

pub fn load(workdir: &Path, stage: &str) -> Option<StageRecord> {
    let bytes = std::fs::read(record_path(workdir, stage)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn save(workdir: &Path, record: &StageRecord) -> anyhow::Result<()> {
    let path = record_path(workdir, &record.stage);
    std::fs::create_dir_all(path.parent().expect("has parent"))?;
    features::fsutil::write_json(&path, record)?;
    Ok(())
}

pub fn remove(workdir: &Path, stage: &str) {
    let _ = std::fs::remove_file(record_path(workdir, stage));
}
