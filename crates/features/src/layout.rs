//! The data-directory contract: what `prepare` writes and every later stage reads, namely the
//! paths inside `DATA_DIR` ([`DataLayout`]) and `dataset.json` ([`DatasetInfo`]: provenance,
//! counts, time range, the settings that shaped the data, the vocabulary checksum).
//!
//! Layout (see `docs/data.md`): `items.parquet`, `users.parquet`, `events.parquet`,
//! `splits/{train,valid,test}.parquet`, `vocab/*.json`, `dataset.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::splits::{Split, SplitConfig};
use crate::tokenizer::VocabConfig;

/// Settings of `prepare` that shape the output, recorded in `dataset.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrepareConfig {
    pub split: SplitConfig,
    pub vocab: VocabConfig,
}

impl PrepareConfig {
    /// Checks the settings before any data is read, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        let split = &self.split;
        if !(0.0..1.0).contains(&split.cold_items) {
            return Err(crate::Error::setting(
                "cold_items",
                format!("{} must be in [0, 1)", split.cold_items),
            ));
        }
        if split.history_len == 0 {
            return Err(crate::Error::setting("history_len", "must be at least 1"));
        }
        if self.vocab.min_count == 0 {
            return Err(crate::Error::setting("min_count", "must be at least 1"));
        }
        if let crate::splits::SplitStrategy::Time {
            cutoff_ms,
            test_cutoff_ms: Some(test),
        } = split.strategy
        {
            if test <= cutoff_ms {
                return Err(crate::Error::setting(
                    "test_cutoff",
                    format!("{test} is not after the validation cut-off {cutoff_ms}"),
                ));
            }
        }
        Ok(())
    }
}

/// Where the raw data came from, for `dataset.json` and for error messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    /// Dataset name (`ml-100k`, `synthetic`, `files`, ...).
    pub source: String,
    /// What was read: packages and versions, file paths, or generator settings.
    pub detail: String,
    /// Label of the items input in errors (a file path for user files).
    pub items_label: PathBuf,
    /// Label of the events input in errors.
    pub events_label: PathBuf,
}

/// Row counts of a prepared dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub items: u64,
    pub users: u64,
    pub events: u64,
    pub train: u64,
    pub valid: u64,
    pub test: u64,
    /// Catalog items in the held-out cold set.
    pub cold_items: u64,
    /// Validation and test examples whose target is a cold item.
    pub cold_targets: u64,
    /// Bad event rows skipped with `--on-bad-rows skip`.
    pub skipped_rows: u64,
}

/// `dataset.json`: the description of a prepared dataset that later stages check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub schema_version: String,
    pub provenance: Provenance,
    pub counts: Counts,
    pub min_ts_ms: i64,
    pub max_ts_ms: i64,
    pub settings: PrepareConfig,
    /// Checksum of `vocab/`; model and index manifests record it.
    pub vocab_checksum: String,
    /// Seconds the whole preparation took.
    pub prepare_seconds: f64,
}

impl DatasetInfo {
    /// Reads `DATA_DIR/dataset.json`.
    pub fn load(data_dir: &Path) -> Result<DatasetInfo> {
        crate::tokenizer::read_json(&data_dir.join("dataset.json"))
    }
}

/// Paths inside a prepared dataset directory.
pub struct DataLayout(pub PathBuf);

impl DataLayout {
    pub fn items(&self) -> PathBuf {
        self.0.join("items.parquet")
    }
    pub fn users(&self) -> PathBuf {
        self.0.join("users.parquet")
    }
    pub fn events(&self) -> PathBuf {
        self.0.join("events.parquet")
    }
    pub fn split(&self, split: Split) -> PathBuf {
        self.0
            .join("splits")
            .join(format!("{}.parquet", split.as_str()))
    }
    pub fn vocab(&self) -> PathBuf {
        self.0.join("vocab")
    }
    pub fn info(&self) -> PathBuf {
        self.0.join("dataset.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_prepare_settings_are_named() {
        PrepareConfig::default().validate().unwrap();
        let mut c = PrepareConfig::default();
        c.split.cold_items = 1.0;
        assert!(c.validate().unwrap_err().to_string().contains("cold_items"));
        let mut c = PrepareConfig::default();
        c.split.history_len = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("history_len"));
    }
}
