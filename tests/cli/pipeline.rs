//! `twotower pipeline run`: stages run once, are skipped while their inputs are unchanged, and
//! rerun when their settings, their upstream outputs or `--force` say so.

use crate::harness::Dir;

const PIPELINE: &str = r#"
[prepare]
dataset = "synthetic"
items = "300"
users = "60"
events = "3000"
seed = 7

[train]
epochs = 1
batch_size = 64
warmup_steps = 5

[train.tower]
dim = 16
token_dim = 16
gru_hidden = 16
item_hidden = [32]
user_hidden = [32]
history_len = 10

[index]
keep = 2

[serve]
addr = "127.0.0.1:50051"
"#;

/// `pipeline run` of `p.toml` into `w`, on the CPU.
pub(crate) const RUN: [&str; 7] = [
    "pipeline",
    "run",
    "p.toml",
    "--workdir",
    "w",
    "--device",
    "cpu",
];

fn stages_run(stderr_and_stdout: &str) -> Vec<&str> {
    ["prepare", "train", "index"]
        .into_iter()
        .filter(|s| stderr_and_stdout.contains(&format!("{s:<8} ran in")))
        .collect()
}

#[test]
fn stages_run_once_then_skip_until_inputs_change() {
    let dir = Dir::new();
    std::fs::write(dir.join("p.toml"), PIPELINE).unwrap();
    let run = |extra: &[&str]| {
        let mut args = RUN.to_vec();
        args.extend_from_slice(extra);
        dir.command(&args).ok()
    };
    let out = run(&[]);
    assert_eq!(stages_run(&out), ["prepare", "train", "index"], "{out}");
    assert!(
        out.contains("two-tower") && out.contains("popularity"),
        "{out}"
    );
    assert!(
        out.contains("artifacts:") && out.contains("recall@100"),
        "{out}"
    );
    for f in [
        "w/data/dataset.json",
        "w/model/model.json",
        "w/index/CURRENT",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }

    let out = run(&[]);
    assert!(stages_run(&out).is_empty(), "{out}");
    assert_eq!(out.matches("up to date (skipped)").count(), 3, "{out}");

    // New index settings: only the index is rebuilt.
    std::fs::write(
        dir.join("p.toml"),
        PIPELINE.replace("keep = 2", "keep = 2\nfactory = \"IVF8,Flat\""),
    )
    .unwrap();
    let out = run(&[]);
    assert_eq!(stages_run(&out), ["index"], "{out}");
    assert!(out.contains("IVF8,Flat"), "{out}");

    // --force train retrains and re-indexes, but does not prepare again.
    let out = run(&["--force", "train"]);
    assert_eq!(stages_run(&out), ["train", "index"], "{out}");

    let err = dir
        .command(&[
            "pipeline",
            "run",
            "p.toml",
            "--workdir",
            "w",
            "--force",
            "deploy",
        ])
        .fails();
    assert!(
        err.contains("invalid value 'deploy' for '--force")
            && err.contains("prepare, train, index"),
        "{err}"
    );
}

#[test]
fn paths_in_a_pipeline_file_are_refused() {
    let dir = Dir::new();
    std::fs::write(
        dir.join("p.toml"),
        PIPELINE.replace("keep = 2", "keep = 2\nout = \"elsewhere\""),
    )
    .unwrap();
    let err = dir
        .command(&["pipeline", "run", "p.toml", "--workdir", "w"])
        .fails();
    assert!(err.contains("`out` is set by the pipeline runner"), "{err}");
}

#[test]
fn a_failed_retrain_leaves_the_previous_model_servable() {
    let dir = Dir::new();
    std::fs::write(dir.join("p.toml"), PIPELINE).unwrap();
    let run = || dir.command(&RUN);
    run().ok();
    let before = std::fs::read(dir.join("w/model/model.json")).unwrap();
    // A retrain that fails (here on its settings, as a kill or a full disk would midway) used to
    // find the served model already deleted.
    std::fs::write(
        dir.join("p.toml"),
        PIPELINE.replace("epochs = 1", "epochs = 1\nlr = -1.0"),
    )
    .unwrap();
    let err = run().fails();
    assert!(err.contains("lr"), "{err}");
    assert_eq!(
        std::fs::read(dir.join("w/model/model.json")).unwrap(),
        before
    );
    assert!(dir.join("w/model/model.safetensors").is_file());
}
