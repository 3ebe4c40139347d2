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

use file::{flags, PipelineFile};
use record::{Inputs, StageRecord};

/// The batch stages, in order.
pub const STAGES: [&str; 3] = ["prepare", "train", "index"];

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
    pub stage: &'static str,
    pub ran: bool,
    pub seconds: f64,
}

/// Runs the stages of `file` in `workdir`; `force` reruns that stage and every later one.
pub fn run(
    file: &PipelineFile,
    workdir: &Path,
    force: Option<&str>,
    device: &str,
) -> anyhow::Result<Vec<StageOutcome>> {
    if let Some(f) = force {
        if !STAGES.contains(&f) {
            bail!("--force `{f}`: expected one of {}", STAGES.join(", "));
        }
    }
    std::fs::create_dir_all(workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let dirs = Workdir(workdir.to_path_buf());
    let forced_from = force.and_then(|f| STAGES.iter().position(|s| *s == f));
    let mut upstream_ran = false;
    let mut outcomes = Vec::new();
    for (i, &stage) in STAGES.iter().enumerate() {
        let inputs = stage_inputs(stage, file, &dirs)?;
        let done = record::load(workdir, stage)
            .is_some_and(|r| r.inputs == inputs && outputs_exist(stage, &dirs));
        let forced = forced_from.is_some_and(|f| i >= f);
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
        record::remove(workdir, stage);
        let start = Instant::now();
        run_stage(stage, file, &dirs, device)
            .with_context(|| format!("pipeline stage `{stage}`"))?;
        let seconds = start.elapsed().as_secs_f64();
        // The inputs of a stage can only be known once the stages before it have run.
        let inputs = stage_inputs(stage, file, &dirs)?;
        record::save(
            workdir,
            &StageRecord {
                stage: stage.into(),
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

fn outputs_exist(stage: &str, dirs: &Workdir) -> bool {
    match stage {
        "prepare" => dirs.data().join("dataset.json").is_file(),
        "train" => dirs.model().join("model.json").is_file(),
        _ => dirs.index().join("CURRENT").is_file(),
    }
}

/// Checksum of what a stage reads: its settings and the outputs of the stages before it.
fn stage_inputs(stage: &str, file: &PipelineFile, dirs: &Workdir) -> anyhow::Result<String> {
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
    Ok(match stage {
        "prepare" => {
            let mut inputs = inputs.value("prepare", &json(&file.prepare));
            // Your own files are inputs too.
            for key in ["items", "events", "users"] {
                if let Some(toml::Value::String(p)) = file.prepare.get(key) {
                    inputs = optional(inputs, key, Path::new(p))?;
                }
            }
            inputs.finish()
        }
        "train" => optional(
            inputs.value("train", &json(&file.train)),
            "dataset",
            &dirs.data().join("dataset.json"),
        )?
        .finish(),
        _ => {
            let inputs = optional(
                inputs.value("index", &json(&file.index)),
                "dataset",
                &dirs.data().join("dataset.json"),
            )?;
            optional(inputs, "model", &dirs.model().join("model.json"))?.finish()
        }
    })
}

fn run_stage(stage: &str, file: &PipelineFile, dirs: &Workdir, device: &str) -> anyhow::Result<()> {
    let path = |p: PathBuf| p.display().to_string();
    match stage {
        "prepare" => {
            let mut argv = flags(&file.prepare)?;
            argv.extend(["--out".into(), path(dirs.data())]);
            crate::commands::prepare::run(parse("prepare", argv)?)
        }
        "train" => {
            // A rerun starts from scratch, not from an old run's checkpoint.
            if dirs.model().exists() {
                std::fs::remove_dir_all(dirs.model())
                    .with_context(|| format!("removing {}", dirs.model().display()))?;
            }
            let argv = vec![
                "--data".into(),
                path(dirs.data()),
                "--out".into(),
                path(dirs.model()),
                "--config".into(),
                path(file.path.clone()),
                "--device".into(),
                device.into(),
            ];
            crate::commands::train::run(parse("train", argv)?)
        }
        _ => {
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
    if !outputs_exist("index", &dirs) {
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
