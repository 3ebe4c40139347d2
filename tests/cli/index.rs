//! `twotower index`, `index --shard` + `index merge`, and `index add` on a small synthetic
//! catalog: what gets published, and that every bad input fails with a clear message while
//! the published version stays current.

use crate::harness::{Dir, TINY_MODEL};

/// Synthetic data in `data` (seeded) and a one-epoch model in `model`.
fn data_and_model(dir: &Dir, data: &str, model: &str, seed: &str) {
    data_and_model_of(dir, data, model, seed, TINY_MODEL);
}

/// [`data_and_model`] with the training config `config`.
fn data_and_model_of(dir: &Dir, data: &str, model: &str, seed: &str, config: &str) {
    dir.command(&[
        "prepare",
        "--dataset",
        "synthetic",
        "--items",
        "400",
        "--users",
        "80",
        "--events",
        "4000",
        "--seed",
        seed,
        "--out",
        data,
    ])
    .ok();
    std::fs::write(dir.join("tiny.toml"), config).unwrap();
    dir.command(&[
        "train",
        "--data",
        data,
        "--out",
        model,
        "--config",
        "tiny.toml",
        "--device",
        "cpu",
    ])
    .ok();
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

fn current(dir: &Dir) -> String {
    std::fs::read_to_string(dir.join("idx/CURRENT")).unwrap()
}

#[test]
fn index_publishes_a_measured_version_and_shards_merge_into_one() {
    let dir = Dir::new();
    data_and_model(&dir, "data", "model", "3");
    let m = json(
        &dir.command(&[
            "index", "--data", "data", "--model", "model", "--out", "idx",
        ])
        .ok(),
    );
    assert_eq!(m["count"], 400);
    assert_eq!(m["factory"], "IVF80,Flat");
    assert!(m["recall_at_100_vs_exact"].as_f64().unwrap() >= 0.95, "{m}");
    let version = m["version"].as_str().unwrap();
    assert_eq!(current(&dir).trim(), version);
    for f in [
        "index.faiss",
        "embeddings.parquet",
        "items.parquet",
        "manifest.json",
    ] {
        assert!(dir.join(&format!("idx/{version}/{f}")).is_file(), "{f}");
    }

    for i in ["0/2", "1/2"] {
        let out = format!("shard{}", &i[..1]);
        dir.command(&[
            "index", "--data", "data", "--model", "model", "--shard", i, "--out", &out,
        ])
        .ok();
    }
    let merged = json(
        &dir.command(&[
            "index",
            "merge",
            "--shards",
            "shard0",
            "shard1",
            "--data",
            "data",
            "--model",
            "model",
            "--out",
            "idx",
            "--factory",
            "IVF16,Flat",
            "--nprobe",
            "16",
        ])
        .ok(),
    );
    assert_eq!(merged["count"], 400);
    assert_eq!(merged["nprobe"], 16);
    assert_eq!(merged["recall_at_10_vs_exact"], 1.0);
    assert_eq!(current(&dir).trim(), merged["version"].as_str().unwrap());
    let err = dir
        .command(&[
            "index", "merge", "--shards", "shard0", "--data", "data", "--model", "model", "--out",
            "idx",
        ])
        .fails();
    assert!(err.contains("missing 1/2"), "{err}");
}

#[test]
fn bad_inputs_fail_clearly_and_leave_current_untouched() {
    let dir = Dir::new();
    data_and_model(&dir, "data", "model", "4");
    dir.command(&[
        "index", "--data", "data", "--model", "model", "--out", "idx",
    ])
    .ok();
    let before = current(&dir);
    let build = |extra: &[&str]| {
        let mut args = vec![
            "index", "--data", "data", "--model", "model", "--out", "idx",
        ];
        args.extend_from_slice(extra);
        dir.command(&args).fails()
    };
    let err = build(&["--factory", "IVFbogus,Flat"]);
    assert!(err.contains("IVFbogus"), "{err}");
    let err = build(&["--factory", "IVF1000,Flat"]);
    assert!(
        err.contains("nlist 1000 must be between 1 and the 400 items"),
        "{err}"
    );
    let err = build(&["--factory", "IVF0,Flat"]);
    assert!(err.contains("nlist 0 must be between 1"), "{err}");
    let err = build(&["--nprobe", "0"]);
    assert!(err.contains("--nprobe"), "{err}");

    // A model trained on other data (other vocabularies).
    data_and_model(&dir, "other", "other-model", "99");
    let err = dir
        .command(&[
            "index",
            "--data",
            "data",
            "--model",
            "other-model",
            "--out",
            "idx",
        ])
        .fails();
    assert!(err.contains("vocabulary mismatch"), "{err}");

    // An output that cannot be a directory.
    std::fs::write(dir.join("a-file"), "x").unwrap();
    let err = dir
        .command(&[
            "index", "--data", "data", "--model", "model", "--out", "a-file",
        ])
        .fails();
    assert!(err.contains("a-file"), "{err}");

    // Duplicate ids in new items.
    let item = |id| features::Item {
        item_id: id,
        title: "twice".into(),
        aspects: vec![],
        categories: vec![],
        created_at_ms: None,
    };
    features::write_table(&dir.join("dup.parquet"), &[item(5000), item(5000)]).unwrap();
    let err = dir
        .command(&[
            "index",
            "add",
            "--items",
            "dup.parquet",
            "--model",
            "model",
            "--index",
            "idx",
        ])
        .fails();
    assert!(
        err.contains("duplicate item id 5000") && err.contains("row 2"),
        "{err}"
    );

    // The same id added and removed in one call.
    features::write_table(&dir.join("one.parquet"), &[item(5001)]).unwrap();
    std::fs::write(dir.join("rm.txt"), "5001\n").unwrap();
    let err = dir
        .command(&[
            "index",
            "add",
            "--items",
            "one.parquet",
            "--remove",
            "rm.txt",
            "--model",
            "model",
            "--index",
            "idx",
        ])
        .fails();
    assert!(
        err.contains("item 5001 is both in --items and in --remove"),
        "{err}"
    );
    let err = dir
        .command(&[
            "index",
            "add",
            "--items",
            "one.parquet",
            "--model",
            "model",
            "--index",
            "idx",
            "--factory",
            "Flat",
        ])
        .fails();
    assert!(
        err.contains("--factory applies to `twotower index` only"),
        "{err}"
    );
    // An id FAISS cannot store.
    features::write_table(&dir.join("huge.parquet"), &[item(u64::MAX)]).unwrap();
    let err = dir
        .command(&[
            "index",
            "add",
            "--items",
            "huge.parquet",
            "--model",
            "model",
            "--index",
            "idx",
        ])
        .fails();
    assert!(
        err.contains("huge.parquet: row 1: column `item_id`")
            && err.contains("the largest id an index can store"),
        "{err}"
    );
    // A CSV file, and a table without rows, are named and change nothing.
    std::fs::write(dir.join("new.csv"), "item_id,title\n7,Hat\n").unwrap();
    let add = |file: &str| {
        dir.command(&[
            "index", "add", "--items", file, "--model", "model", "--index", "idx",
        ])
        .fails()
    };
    let err = add("new.csv");
    assert!(
        err.contains("new.csv") && err.contains("Parquet items table"),
        "{err}"
    );
    features::write_table::<features::Item>(&dir.join("none.parquet"), &[]).unwrap();
    let err = add("none.parquet");
    assert!(err.contains("none.parquet: no items to add"), "{err}");

    // Removing every item would publish an empty catalog.
    let items: Vec<features::Item> = features::read_table(&dir.join("data/items.parquet")).unwrap();
    let ids: String = items.iter().map(|i| format!("{}\n", i.item_id)).collect();
    std::fs::write(dir.join("all.txt"), ids).unwrap();
    let err = dir
        .command(&[
            "index", "add", "--remove", "all.txt", "--model", "model", "--index", "idx",
        ])
        .fails();
    assert!(err.contains("empty catalog"), "{err}");

    // A model other than the one the index was built with.
    let err = dir
        .command(&[
            "index",
            "add",
            "--remove",
            "all.txt",
            "--model",
            "other-model",
            "--index",
            "idx",
        ])
        .fails();
    assert!(err.contains("rebuild with `twotower index`"), "{err}");

    // A corrupt model.
    std::fs::write(dir.join("model/model.safetensors"), "garbage").unwrap();
    let err = build(&[]);
    assert!(err.contains("model.safetensors"), "{err}");

    assert_eq!(current(&dir), before);
    let mut entries: Vec<String> = std::fs::read_dir(dir.join("idx"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries.len(),
        3,
        "CURRENT, the job lock and the one version: {entries:?}"
    );
    assert!(
        entries.contains(&".lock".to_string()) && entries.contains(&"CURRENT".to_string()),
        "{entries:?}"
    );
}

#[test]
fn a_hybrid_model_embeds_items_it_never_trained_on_from_content_alone() {
    let dir = Dir::new();
    let hybrid = TINY_MODEL.replace("[tower]\n", "[tower]\nitem_id_dim = 8\n");
    data_and_model_of(&dir, "data", "model", "42", &hybrid);
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model/model.json")).unwrap()).unwrap();
    assert_eq!(info["tower"]["item_id_dim"], 8, "{info}");
    dir.command(&[
        "index", "--data", "data", "--model", "model", "--out", "idx", "--device", "cpu",
    ])
    .ok();

    // The most frequent training target, and two copies of its content under new ids.
    let vocab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model/vocab/item_ids.json")).unwrap())
            .unwrap();
    let known: u64 = vocab["tokens"][0].as_str().unwrap().parse().unwrap();
    let items: Vec<features::Item> = features::read_table(&dir.join("data/items.parquet")).unwrap();
    let original = items.iter().find(|i| i.item_id == known).unwrap();
    let copy = |id| features::Item {
        item_id: id,
        ..original.clone()
    };
    features::write_table(&dir.join("new.parquet"), &[copy(9001), copy(9002)]).unwrap();
    dir.command(&[
        "index",
        "add",
        "--items",
        "new.parquet",
        "--model",
        "model",
        "--index",
        "idx",
    ])
    .ok();
    let version = current(&dir);
    let emb = features::Embeddings::read(
        &dir.join("idx")
            .join(version.trim())
            .join("embeddings.parquet"),
    )
    .unwrap();
    let rows = emb.row_of().unwrap();
    let vector = |id: u64| emb.vector(rows[&id] as usize).to_vec();
    assert_eq!(
        vector(9001),
        vector(9002),
        "new items: content only, so identical"
    );
    assert_ne!(
        vector(9001),
        vector(known),
        "the trained item has its own id vector"
    );
}
