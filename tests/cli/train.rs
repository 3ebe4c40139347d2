//! `twotower train` and `twotower eval` on a small synthetic dataset: artifacts, determinism,
//! resume after a kill, and bad input.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Dir, PREPARE_FILES};

const SMALL_MODEL: &str = "epochs = 3\nbatch_size = 128\nwarmup_steps = 10\n[tower]\ndim = 32\ntoken_dim = 32\ngru_hidden = 32\nitem_hidden = [64]\nuser_hidden = [64]\nhistory_len = 20\n";

fn prepared(dir: &Dir, name: &str, seed: &str) {
    dir.command(&[
        "prepare",
        "--dataset",
        "synthetic",
        "--items",
        "400",
        "--users",
        "80",
        "--events",
        "5000",
        "--seed",
        seed,
        "--out",
        name,
    ])
    .ok();
    std::fs::write(dir.join("small.toml"), SMALL_MODEL).unwrap();
}

fn metrics(dir: &Dir, model: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(model).join("metrics.json")).unwrap()).unwrap()
}

fn train(dir: &Dir, out: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "train",
        "--data",
        "data",
        "--out",
        out,
        "--config",
        "small.toml",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    dir.command(&args).ok()
}

#[test]
fn training_writes_every_artifact_and_is_deterministic() {
    let dir = Dir::new();
    prepared(&dir, "data", "5");
    let out = train(&dir, "m1", &[]);
    assert!(
        out.contains("two-tower") && out.contains("popularity"),
        "{out}"
    );
    for f in [
        "model.safetensors",
        "model.json",
        "metrics.json",
        "train_log.jsonl",
        "training_curves.png",
    ] {
        assert!(dir.join("m1").join(f).is_file(), "missing {f}");
    }
    let log = std::fs::read_to_string(dir.join("m1/train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
    let m1 = metrics(&dir, "m1");
    for key in ["recall@10", "ndcg@10", "mrr@10", "recall@50", "recall@100"] {
        for model in [
            "test",
            "baseline_popularity",
            "baseline_recent_popularity",
            "baseline_item_knn",
        ] {
            assert!(m1[model][key].is_f64(), "{model} {key}: {m1}");
        }
    }
    assert!(
        out.contains("recent popularity") && out.contains("item-kNN"),
        "{out}"
    );
    train(&dir, "m2", &[]);
    assert_eq!(
        m1["test"],
        metrics(&dir, "m2")["test"],
        "same seed, same metrics"
    );

    // eval reproduces the test metrics of training; a second stage at weight 0 is the towers.
    let eval: serde_json::Value = serde_json::from_str(
        &dir.command(&[
            "eval",
            "--data",
            "data",
            "--model",
            "m1",
            "--device",
            "cpu",
            "--rerank-sweep",
            "0,2",
        ])
        .ok(),
    )
    .unwrap();
    let sweep = eval["rerank_sweep"].as_array().unwrap();
    assert_eq!(sweep.len(), 2, "{eval}");
    assert_eq!(sweep[1]["beta"], 2.0, "{eval}");
    assert_eq!(sweep[1]["depth"], 200, "{eval}");
    for key in ["recall@10", "ndcg@10", "recall@100"] {
        let (a, b) = (
            sweep[0]["metrics"][key].as_f64().unwrap(),
            eval["test"][key].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-9, "{key}: weight 0 {a} vs towers {b}");
    }
    for key in ["recall@10", "ndcg@10", "recall@100"] {
        let (a, b) = (
            eval["test"][key].as_f64().unwrap(),
            m1["test"][key].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-9, "{key}: eval {a} vs train {b}");
        for baseline in ["baseline_recent_popularity", "baseline_item_knn"] {
            let (a, b) = (
                eval[baseline][key].as_f64().unwrap(),
                m1[baseline][key].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() < 1e-9,
                "{baseline} {key}: eval {a} vs train {b}"
            );
        }
    }
}

#[test]
fn resume_after_a_kill_matches_an_uninterrupted_run() {
    let dir = Dir::new();
    prepared(&dir, "data", "6");
    train(&dir, "full", &[]);
    // Start the same run, kill -9 it once the first epoch's checkpoint exists, then resume.
    let mut child = Command::new(env!("CARGO_BIN_EXE_twotower"))
        .args([
            "train",
            "--data",
            "data",
            "--out",
            "killed",
            "--config",
            "small.toml",
            "--device",
            "cpu",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let state = dir.join("killed/checkpoint/state.json");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !state.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(state.exists(), "no checkpoint appeared");
    assert!(
        !dir.join("killed/model.json").exists(),
        "the run finished before it was killed"
    );
    train(&dir, "killed", &["--resume"]);
    let (full, resumed) = (metrics(&dir, "full"), metrics(&dir, "killed"));
    for key in ["recall@10", "ndcg@10", "recall@50"] {
        let (a, b) = (
            full["test"][key].as_f64().unwrap(),
            resumed["test"][key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-6,
            "{key}: uninterrupted {a}, resumed {b}"
        );
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = Dir::new();
    prepared(&dir, "data", "7");
    let base = [
        "train",
        "--data",
        "data",
        "--out",
        "m",
        "--config",
        "small.toml",
    ];
    let err = dir
        .command(&[&base[..], &["--device", "tpu"]].concat())
        .fails();
    assert!(err.contains("device `tpu`"), "{err}");
    let err = dir
        .command(&[&base[..], &["--batch-size", "0"]].concat())
        .fails();
    assert!(err.contains("batch_size"), "{err}");
    let err = dir
        .command(&["train", "--data", "nowhere", "--out", "m"])
        .fails();
    assert!(
        err.contains("nowhere") && err.contains("twotower prepare"),
        "{err}"
    );
    std::fs::write(dir.join("bad.toml"), "epochz = 1\n").unwrap();
    let err = dir
        .command(&[
            "train", "--data", "data", "--out", "m", "--config", "bad.toml",
        ])
        .fails();
    assert!(err.contains("bad.toml") && err.contains("epochz"), "{err}");

    // A model trained on one dataset refuses another dataset's vocabulary.
    std::fs::write(
        dir.join("one.toml"),
        SMALL_MODEL.replace("epochs = 3", "epochs = 1"),
    )
    .unwrap();
    dir.command(&[
        "train", "--data", "data", "--out", "m", "--config", "one.toml", "--device", "cpu",
    ])
    .ok();
    prepared(&dir, "other", "8");
    let err = dir
        .command(&["eval", "--data", "other", "--model", "m", "--device", "cpu"])
        .fails();
    assert!(err.contains("vocabulary mismatch"), "{err}");
    let err = dir
        .command(&[
            "eval",
            "--data",
            "data",
            "--model",
            "m",
            "--device",
            "cpu",
            "--rerank-sweep",
            "0,nan",
        ])
        .fails();
    assert!(err.contains("--rerank-sweep"), "{err}");

    // A corrupt weights file is caught by its checksum.
    let weights = dir.join("m/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&weights, bytes).unwrap();
    let err = dir
        .command(&["eval", "--data", "data", "--model", "m", "--device", "cpu"])
        .fails();
    assert!(
        err.contains("model.safetensors") && err.contains("corrupt"),
        "{err}"
    );
    std::fs::remove_file(&weights).unwrap();
    let err = dir
        .command(&["eval", "--data", "data", "--model", "m", "--device", "cpu"])
        .fails();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn data_without_training_examples_is_refused() {
    let dir = Dir::new();
    // One user with one event: a single training example, and no other row to contrast it with.
    std::fs::write(
        dir.join("items.csv"),
        "item_id,title,aspects,categories\n1,a,,c\n2,b,,c\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("events.csv"),
        "user_id,ts,event_type,item_id,query,value\n1,1000,view,1,,\n",
    )
    .unwrap();
    dir.command(&PREPARE_FILES).ok();
    let err = dir
        .command(&["train", "--data", "data", "--out", "m", "--device", "cpu"])
        .fails();
    assert!(err.contains("training examples"), "{err}");
}
