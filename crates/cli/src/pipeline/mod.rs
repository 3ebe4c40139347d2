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
use clap::{Args, Parser};
use features::DataLayout;
use towers::artifact::ModelLayout;

use file::{flags, PipelineFile};
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
            eprintln!("[pipeline] {stage}: up to date, skipped");
            outcomes.push(StageOutcome {
                stage,
                ran: false,
                seconds: 0.0,
            });
            continue;
        }
        eprintln!("[pipeline] {stage}: running");
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
        eprintln!("[pipeline] {stage}: done in {seconds:.1} s");
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
            for key in ["items", "events", "users"] {
                if let Some(toml::Value::String(p)) = file.prepare.get(key) {
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
    let path = |p: PathBuf| p.display().to_string();
    match stage {
        Stage::Prepare => {
            let mut argv = flags(&file.prepare)?;
            argv.extend(["--out".into(), path(dirs.data())]);
            crate::commands::prepare::run(parse("prepare", argv)?)
        }
        Stage::Train => {
            // A rerun starts from scratch, not from an old run's checkpoint.
            if dirs.model().exists() {
                std::fs::remove_dir_all(dirs.model())
                    .with_context(|| format!("removing {}", dirs.model().display()))?;
            }
            // `trainer::train` validates the config.
            crate::commands::train::train(trainer::TrainOptions {
                data: dirs.data(),
                out: dirs.model(),
                config: file.train_config()?,
                device: crate::commands::device(device)?,
                resume: false,
            })
        }
        Stage::Index => {
            let mut argv = flags(&file.index)?;
            if !file.index.contains_key("device") {
                argv.extend(["--device".into(), device.into()]);
            }
            argv.extend([
                "--data".into(),
                path(dirs.data()),
                "--model".into(),
                path(dirs.model()),
                "--out".into(),
                path(dirs.index()),
            ]);
            crate::commands::index::execute(parse("index", argv)?).map(|_| ())
        }
    }
}

/// Starts `twotower serve` on the pipeline's outputs with the flags of its `[serve]` table
/// (plus `extra` flags, which come later and so override them).
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
    // Flags given here replace the table's.
    let mut table = file.serve.clone();
    for flag in extra.iter().filter_map(|a| a.strip_prefix("--")) {
        table.remove(&flag.split('=').next().unwrap_or(flag).replace('-', "_"));
    }
    let mut argv = flags(&table)?;
    for (flag, dir) in [
        ("--model", dirs.model()),
        ("--index", dirs.index()),
        ("--data", dirs.data()),
    ] {
        argv.extend([flag.to_string(), dir.display().to_string()]);
    }
    argv.extend(extra.iter().cloned());
    crate::commands::serve::run(parse("serve", argv)?)
}

/// Parses a stage's arguments exactly as the CLI would.
fn parse<T: Args>(name: &str, argv: Vec<String>) -> anyhow::Result<T> {
    #[derive(Parser)]
    struct Wrap<T: Args> {
        #[command(flatten)]
        inner: T,
    }
    let argv = std::iter::once(format!("twotower {name}")).chain(argv);
    Ok(Wrap::<T>::try_parse_from(argv)
        .map_err(|e| anyhow::anyhow!("[{name}] settings: {e}"))?
        .inner)
}
