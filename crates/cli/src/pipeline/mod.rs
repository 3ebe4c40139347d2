//! `twotower pipeline run FILE --workdir DIR`: prepare → train → index for one dataset, each
//! stage skipped when its outputs exist and its inputs (settings and input files, by checksum)
//! are unchanged since it last ran.
//!
//! ```text
//! WORKDIR/data     prepared dataset      WORKDIR/.pipeline/prepare.json
//! WORKDIR/model    trained model         WORKDIR/.pipeline/train.json
//! WORKDIR/index    INDEX_ROOT            WORKDIR/.pipeline/index.json
//! ```

pub mod file;
pub mod record;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use features::DataLayout;
use towers::artifact::ModelLayout;

use crate::commands::serve::{ServeArgs, ServeSettings};
use crate::settings;
use file::PipelineFile;
use record::{Inputs, StageRecord};

/// A batch stage. Declared in run order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Stage {
    Prepare,
    Train,
    Index,
}

impl Stage {
    /// Every stage, in run order.
    pub const ALL: [Stage; 3] = [Stage::Prepare, Stage::Train, Stage::Index];

    /// The stage's name (its record file, its log lines, `--force`).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Prepare => "prepare",
            Stage::Train => "train",
            Stage::Index => "index",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// Paths of a pipeline's outputs.
pub struct Workdir(pub PathBuf);

impl Workdir {
    pub fn data(&self) -> PathBuf {
        self.0.join("data")
    }
    pub fn model(&self) -> PathBuf {
        self.0.join("model")
    }
    pub fn index(&self) -> PathBuf {
        self.0.join("index")
    }
}

/// What a run did.
pub struct StageOutcome {
    pub stage: Stage,
    pub ran: bool,
    pub seconds: f64,
}

/// Runs the stages of `file` in `workdir`; `force` reruns that stage and every later one.
pub fn run(
    file: &PipelineFile,
    workdir: &Path,
    force: Option<Stage>,
    device: &str,
) -> anyhow::Result<Vec<StageOutcome>> {
    std::fs::create_dir_all(workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let dirs = Workdir(workdir.to_path_buf());
    let mut upstream_ran = false;
    let mut outcomes = Vec::new();
    for stage in Stage::ALL {
        let inputs = stage_inputs(stage, file, &dirs)?;
        let done = record::load(workdir, stage.name())
            .is_some_and(|r| r.inputs == inputs && outputs_exist(stage, &dirs));
        let forced = force.is_some_and(|f| stage >= f);
        if done && !forced && !upstream_ran {
            errln!("[pipeline] {stage}: up to date, skipped");
            outcomes.push(StageOutcome {
                stage,
                ran: false,
                seconds: 0.0,
            });
            continue;
        }
        errln!("[pipeline] {stage}: running");
        record::remove(workdir, stage.name());
        let start = Instant::now();
        run_stage(stage, file, &dirs, device)
            .with_context(|| format!("pipeline stage `{stage}`"))?;
        let seconds = start.elapsed().as_secs_f64();
        // The inputs of a stage can only be known once the stages before it have run.
        let inputs = stage_inputs(stage, file, &dirs)?;
        record::save(
            workdir,
            &StageRecord {
                stage: stage.name().into(),
                inputs,
                finished_at: chrono_now(),
                seconds,
            },
        )?;
        errln!("[pipeline] {stage}: done in {seconds:.1} s");
        upstream_ran = true;
        outcomes.push(StageOutcome {
            stage,
            ran: true,
            seconds,
        });
    }
    Ok(outcomes)
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn outputs_exist(stage: Stage, dirs: &Workdir) -> bool {
    match stage {
        Stage::Prepare => DataLayout(dirs.data()).info().is_file(),
        Stage::Train => ModelLayout(dirs.model()).info().is_file(),
        Stage::Index => indexer::IndexRoot::new(dirs.index())
            .current_path()
            .is_file(),
    }
}

/// Checksum of what a stage reads: its settings and the outputs of the stages before it.
fn stage_inputs(stage: Stage, file: &PipelineFile, dirs: &Workdir) -> anyhow::Result<String> {
    let version = env!("CARGO_PKG_VERSION");
    let json = |t: &toml::Table| serde_json::to_string(t).expect("serializable");
    let optional = |inputs: Inputs, name: &str, path: &Path| -> anyhow::Result<Inputs> {
        if path.is_file() {
            inputs.file(name, path)
        } else {
            Ok(inputs.value(name, "absent"))
        }
    };
    let inputs = Inputs::default().value("twotower", version);
    let dataset_json = DataLayout(dirs.data()).info();
    Ok(match stage {
        Stage::Prepare => {
            let mut inputs = inputs.value("prepare", &json(&file.prepare));
            // Your own files are inputs too.
            let s = file.prepare_settings()?;
            for (key, value) in [
                ("items", &s.items),
                ("events", &s.events),
                ("users", &s.users),
            ] {
                if let Some(p) = value {
                    inputs = optional(inputs, key, Path::new(p))?;
                }
            }
            inputs.finish()
        }
        Stage::Train => optional(
            inputs.value("train", &json(&file.train)),
            "dataset",
            &dataset_json,
        )?
        .finish(),
        Stage::Index => {
            let inputs = optional(
                inputs.value("index", &json(&file.index)),
                "dataset",
                &dataset_json,
            )?;
            optional(inputs, "model", &ModelLayout(dirs.model()).info())?.finish()
        }
    })
}

fn run_stage(
    stage: Stage,
    file: &PipelineFile,
    dirs: &Workdir,
    device: &str,
) -> anyhow::Result<()> {
    use crate::commands::{index, prepare, train};
    match stage {
        Stage::Prepare => prepare::prepare_dataset(&file.prepare_settings()?, &dirs.data()),
        Stage::Train => {
            // A rerun starts from scratch, not from an old run's checkpoint. The model itself
            // stays until training swaps the new one in whole: a server may be serving it, and a
            // retrain that fails or is killed must leave it servable.
            let checkpoint = towers::ModelLayout(dirs.model()).checkpoint();
            if checkpoint.exists() {
                std::fs::remove_dir_all(&checkpoint)
                    .with_context(|| format!("removing {}", checkpoint.display()))?;
            }
            // `trainer::train` validates the config.
            train::train(trainer::TrainOptions {
                data: dirs.data(),
                out: dirs.model(),
                config: file.train_config()?,
                device: crate::commands::device(device)?,
                resume: false,
            })
        }
        Stage::Index => {
            let mut settings = file.index_settings()?;
            if !file.index.contains_key("device") {
                settings.publish.device = device.into();
            }
            let opts = index::build_options(&settings, dirs.data(), dirs.model(), dirs.index())?;
            index::report(&index::build(&opts)?);
            Ok(())
        }
    }
}

/// Starts `twotower serve` on the pipeline's outputs with its `[serve]` settings, overridden by
/// the `extra` flags given on the command line.
pub fn serve(file: &PipelineFile, workdir: &Path, extra: &[String]) -> anyhow::Result<()> {
    let dirs = Workdir(workdir.to_path_buf());
    if !outputs_exist(Stage::Index, &dirs) {
        bail!(
            "{}: no index yet; run `twotower pipeline run {} --workdir {}` first",
            workdir.display(),
            file.path.display(),
            workdir.display()
        );
    }
    let (cli, matches) = settings::parse::<ServeSettings>("serve", extra.iter().cloned())?;
    let settings = settings::overlay(&file.serve_settings()?, &cli, &matches)?;
    crate::commands::serve::run(ServeArgs::new(
        dirs.model(),
        dirs.index(),
        dirs.data(),
        settings,
    ))
}
