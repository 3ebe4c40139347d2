//! A pipeline file (`pipelines/*.toml`): the settings of every stage for one dataset.
//!
//! `[prepare]`, `[index]` and `[serve]` hold the flags of `twotower prepare`, `twotower index`
//! and `twotower serve` (`cold_items = 0.1` is `--cold-items 0.1`), so a pipeline file can say
//! nothing the CLI could not, and the CLI validates both the same way. `[train]` is the training
//! config (`trainer::TrainConfig`), handed to the train stage as it is; `twotower train --config`
//! reads it from a pipeline file too.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// The parsed file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Flags of `twotower prepare` (without `--out`).
    pub prepare: toml::Table,
    /// The training config.
    #[serde(default)]
    pub train: toml::Table,
    /// Flags of `twotower index` (without `--data`, `--model`, `--out`).
    #[serde(default)]
    pub index: toml::Table,
    /// Flags of `twotower serve` (without `--model`, `--index`, `--data`).
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
        Ok(file)
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

/// A table of flags as command-line arguments: `key = v` → `--key v` (underscores become
/// dashes), `flag = true` → `--flag`, `flag = false` → nothing, arrays → one value each.
pub fn flags(table: &toml::Table) -> anyhow::Result<Vec<String>> {
    let mut args = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Datetime(d) => d.to_string(),
                other => bail!("`{key}`: {other} cannot be a command-line value"),
            })
        };
        match value {
            toml::Value::Boolean(true) => args.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                args.push(flag);
                for v in items {
                    args.push(scalar(v)?);
                }
            }
            v => {
                args.push(flag);
                args.push(scalar(v)?);
            }
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_become_flags() {
        let t: toml::Table =
            toml::from_str("dataset = 'synthetic'\ncold_items = 0.1\nitems = 400\nverbose = true\nquiet = false\nk = [10, 50]").unwrap();
        assert_eq!(
            flags(&t).unwrap(),
            [
                "--cold-items",
                "0.1",
                "--dataset",
                "synthetic",
                "--items",
                "400",
                "--k",
                "10",
                "50",
                "--verbose"
            ]
        );
    }

    #[test]
    fn every_pipeline_file_in_the_repository_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let file = PipelineFile::load(&path).unwrap();
                flags(&file.prepare).unwrap();
                flags(&file.index).unwrap();
                flags(&file.serve).unwrap();
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
