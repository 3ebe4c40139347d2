//! A pipeline file (`pipelines/*.toml`): the settings of every stage for one dataset.
//!
//! `[prepare]`, `[index]` and `[serve]` hold the settings of `twotower prepare`, `twotower
//! index` and `twotower serve` under their flags' names (`cold_items = 0.1` is `--cold-items
//! 0.1`), read into the same typed structs the command line fills (`crate::settings`), so a
//! pipeline file can say nothing the CLI could not. `[train]` is the training config
//! (`trainer::TrainConfig`); `twotower train --config` reads it from a pipeline file too. Every
//! table is checked when the file is loaded, before any stage runs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::commands::{index::IndexSettings, prepare::PrepareSettings, serve::ServeSettings};
use crate::settings::from_table;

/// The parsed file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Settings of `twotower prepare` (without `--out`).
    pub prepare: toml::Table,
    /// The training config.
    #[serde(default)]
    pub train: toml::Table,
    /// Settings of `twotower index` (without `--data`, `--model`, `--out`, `--shard`).
    #[serde(default)]
    pub index: toml::Table,
    /// Settings of `twotower serve` (without `--model`, `--index`, `--data`).
    #[serde(default)]
    pub serve: toml::Table,
    #[serde(skip)]
    pub path: PathBuf,
}

impl PipelineFile {
    pub fn load(path: &Path) -> anyhow::Result<PipelineFile> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut file: PipelineFile = toml::from_str(&text)
            .with_context(|| format!("{}: invalid pipeline file", path.display()))?;
        file.path = path.to_path_buf();
        for (table, reserved) in [
            (&file.prepare, &["out"][..]),
            (&file.index, &["data", "model", "out", "shard"]),
            (&file.serve, &["data", "model", "index"]),
        ] {
            if let Some(key) = reserved.iter().find(|k| table.contains_key(**k)) {
                bail!(
                    "{}: `{key}` is set by the pipeline runner (paths come from --workdir; shard jobs run as `twotower index --shard`); remove it",
                    path.display()
                );
            }
        }
        let check = |r: anyhow::Result<()>| r.with_context(|| format!("{}", path.display()));
        check(file.prepare_settings().map(drop))?;
        check(file.train_config().map(drop))?;
        check(file.index_settings().map(drop))?;
        check(file.serve_settings().map(drop))?;
        Ok(file)
    }

    /// The `[prepare]` settings.
    pub fn prepare_settings(&self) -> anyhow::Result<PrepareSettings> {
        from_table(&self.prepare, "prepare")
    }

    /// The `[index]` settings.
    pub fn index_settings(&self) -> anyhow::Result<IndexSettings> {
        from_table(&self.index, "index")
    }

    /// The `[serve]` settings.
    pub fn serve_settings(&self) -> anyhow::Result<ServeSettings> {
        from_table(&self.serve, "serve")
    }

    /// The training config of the `[train]` table.
    pub fn train_config(&self) -> anyhow::Result<trainer::TrainConfig> {
        let source = format!("{} [train]", self.path.display());
        Ok(trainer::TrainConfig::from_toml_table(
            self.train.clone(),
            &source,
        )?)
    }
}

/// The training config in a `--config` file: a pipeline file's `[train]` table, or a file of
/// training settings at its top level.
pub fn train_config_file(path: &Path) -> anyhow::Result<trainer::TrainConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    match table.get("train") {
        // A pipeline file: loaded as one, so its other tables are checked too.
        Some(toml::Value::Table(_)) => PipelineFile::load(path)?.train_config(),
        _ => Ok(trainer::TrainConfig::from_toml_table(
            table,
            &path.display().to_string(),
        )?),
    }
}

/// Whether `path` reads as a pipeline file (a TOML file with a `[prepare]` table).
pub fn is_pipeline_file(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
        .is_some_and(|t| matches!(t.get("prepare"), Some(toml::Value::Table(_))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_setting_fails_at_load_naming_file_table_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[prepare]\ndataset = 'ml-100k'\n[index]\nnprobe = 8\nkeeep = 2\n",
        )
        .unwrap();
        let err = format!("{:#}", PipelineFile::load(&path).unwrap_err());
        assert!(
            err.contains("p.toml") && err.contains("[index] `keeep`"),
            "{err}"
        );
        assert!(is_pipeline_file(&path));
    }

    #[test]
    fn every_pipeline_file_in_the_repository_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let file = PipelineFile::load(&path).unwrap();
                file.train_config().unwrap().validate().unwrap();
                assert_eq!(
                    train_config_file(&path).unwrap().epochs,
                    file.train_config().unwrap().epochs
                );
                seen += 1;
            }
        }
        assert!(seen >= 4, "{seen} pipeline files");
    }
}
