//! `twotower prepare` as a user runs it: their own CSV files, bad rows, and the synthetic data.

use crate::harness::{Dir, PREPARE_FILES};

const ITEMS: &str = "item_id,title,aspects,categories\n1,Red running shoe,brand:acme|color:red,shoes|running\n2,Blue hat,brand:zed,hats\n3,Green scarf,,scarves\n";

fn events(rows: &[&str]) -> String {
    let mut s = String::from("user_id,ts,event_type,item_id,query,value\n");
    for r in rows {
        s.push_str(r);
        s.push('\n');
    }
    s
}

fn good_events() -> String {
    events(&[
        "7,1000,view,1,,",
        "7,2000,search,,red shoes,",
        "7,3000,purchase,2,,1",
        "7,4000,view,3,,",
        "8,1500,view,2,,",
        "8,2500,view,3,,",
    ])
}

fn prepare_files(dir: &Dir, events_csv: &str, extra: &[&str]) -> crate::harness::TestCommand {
    std::fs::write(dir.join("items.csv"), ITEMS).unwrap();
    std::fs::write(dir.join("events.csv"), events_csv).unwrap();
    let mut args = PREPARE_FILES.to_vec();
    args.extend_from_slice(extra);
    dir.command(&args)
}

#[test]
fn own_csv_files_become_a_dataset() {
    let dir = Dir::new();
    let out = prepare_files(&dir, &good_events(), &[]).ok();
    assert!(out.contains("3 items, 2 users, 6 events"), "{out}");
    for f in [
        "items.parquet",
        "users.parquet",
        "events.parquet",
        "splits/train.parquet",
        "splits/valid.parquet",
        "splits/test.parquet",
        "vocab/checksums.json",
        "dataset.json",
    ] {
        assert!(dir.join("data").join(f).is_file(), "missing {f}");
    }
}

#[test]
fn ties_within_a_second_follow_the_chosen_order() {
    // User 9 views items 3 then 1 in the same second, after item 2.
    let csv = events(&["9,5000,view,3,,", "9,1000,view,2,,", "9,5000,view,1,,"]);
    for (ties, test_target, valid_target) in [("item-id", 3, 1), ("source", 1, 3)] {
        let dir = Dir::new();
        prepare_files(&dir, &csv, &["--ties", ties]).ok();
        let data = dir.join("data");
        let test: Vec<features::Example> =
            features::read_table(&data.join("splits/test.parquet")).unwrap();
        let valid: Vec<features::Example> =
            features::read_table(&data.join("splits/valid.parquet")).unwrap();
        assert_eq!(test[0].target_item_id, test_target, "--ties {ties}");
        assert_eq!(valid[0].target_item_id, valid_target, "--ties {ties}");
        // Nothing of the target's own second is history, whichever order.
        let history: Vec<_> = test[0].history.iter().map(|h| h.item_id).collect();
        assert_eq!(history, [Some(2)], "--ties {ties}");
        let info = std::fs::read_to_string(data.join("dataset.json")).unwrap();
        assert!(
            info.contains(&format!("\"ties\": \"{}\"", ties.replace('-', "_"))),
            "{info}"
        );
    }
}

#[test]
fn positional_history_takes_the_ties_ordered_before_the_target() {
    // User 9 views items 3 then 1 in the same second, after item 2.
    let csv = events(&["9,5000,view,3,,", "9,1000,view,2,,", "9,5000,view,1,,"]);
    let dir = Dir::new();
    prepare_files(&dir, &csv, &["--ties", "source", "--history", "positional"]).ok();
    let data = dir.join("data");
    let test: Vec<features::Example> =
        features::read_table(&data.join("splits/test.parquet")).unwrap();
    assert_eq!(test[0].target_item_id, 1);
    let history: Vec<_> = test[0].history.iter().map(|h| h.item_id).collect();
    assert_eq!(
        history,
        [Some(2), Some(3)],
        "the tie ordered first is history"
    );
    let info = std::fs::read_to_string(data.join("dataset.json")).unwrap();
    assert!(info.contains("\"history\": \"positional\""), "{info}");
    // The default stays strict, and says so.
    let dir = Dir::new();
    prepare_files(&dir, &csv, &[]).ok();
    let info = std::fs::read_to_string(dir.join("data/dataset.json")).unwrap();
    assert!(info.contains("\"history\": \"strict\""), "{info}");
    let err = prepare_files(&Dir::new(), &csv, &["--history", "future"]).fails();
    assert!(err.contains("--history") && err.contains("future"), "{err}");
}

#[test]
fn each_bad_row_is_named_and_nothing_is_left_behind() {
    let cases: [(&str, &str, &str); 5] = [
        ("7,1000,click,1,,", "event_type", "unknown event type"),
        ("7,-5,view,1,,", "ts", "negative"),
        ("7,yesterday,view,1,,", "ts", "yesterday"),
        ("7,1000,view,42,,", "item_id", "unknown item 42"),
        ("7,1000,view,,,", "item_id", "needs an item_id"),
    ];
    for (row, column, reason) in cases {
        let dir = Dir::new();
        let err = prepare_files(&dir, &events(&["8,500,view,2,,", row]), &[]).fails();
        assert!(
            err.contains("events.csv")
                && err.contains("row 2")
                && err.contains(column)
                && err.contains(reason),
            "{row}: {err}"
        );
        assert!(!dir.join("data").exists(), "{row}: output left behind");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{row}: stray files {leftovers:?}");
    }
}

#[test]
fn bad_rows_can_be_skipped_and_are_counted() {
    let dir = Dir::new();
    let mut rows = good_events();
    rows.push_str("7,1000,click,1,,\n7,-1,view,1,,\n");
    let out = prepare_files(&dir, &rows, &["--on-bad-rows", "skip"]).ok();
    assert!(out.contains("skipped 2 bad rows"), "{out}");
}

#[test]
fn missing_column_duplicate_item_and_empty_file_are_errors() {
    let dir = Dir::new();
    let err = prepare_files(&dir, "user_id,event_type,item_id\n7,view,1\n", &[]).fails();
    assert!(err.contains("events.csv") && err.contains("`ts`"), "{err}");

    let dir = Dir::new();
    std::fs::write(
        dir.join("items.csv"),
        format!("{ITEMS}2,Another hat,,hats\n"),
    )
    .unwrap();
    std::fs::write(dir.join("events.csv"), good_events()).unwrap();
    let err = dir.command(&PREPARE_FILES).fails();
    assert!(
        err.contains("items.csv") && err.contains("row 4") && err.contains("duplicate item_id 2"),
        "{err}"
    );

    let dir = Dir::new();
    let err = prepare_files(&dir, "user_id,ts,event_type,item_id,query,value\n", &[]).fails();
    assert!(
        err.contains("events.csv") && err.contains("no rows"),
        "{err}"
    );
}

#[test]
fn unknown_dataset_and_bad_options_are_explained() {
    let dir = Dir::new();
    let err = dir
        .command(&["prepare", "--dataset", "netflix", "--out", "d"])
        .fails();
    assert!(err.contains("netflix") && err.contains("ml-100k"), "{err}");
    let err = dir
        .command(&[
            "prepare",
            "--dataset",
            "synthetic",
            "--items",
            "many",
            "--out",
            "d",
        ])
        .fails();
    assert!(err.contains("--items") && err.contains("many"), "{err}");
    let err = dir
        .command(&[
            "prepare",
            "--dataset",
            "synthetic",
            "--cold-items",
            "1.5",
            "--out",
            "d",
        ])
        .fails();
    assert!(err.contains("--cold-items"), "{err}");
    let err = dir
        .command(&[
            "prepare",
            "--dataset",
            "synthetic",
            "--split",
            "time",
            "--out",
            "d",
        ])
        .fails();
    assert!(err.contains("--cutoff"), "{err}");
}

#[test]
fn synthetic_prepare_is_deterministic() {
    let dir = Dir::new();
    for out in ["a", "b"] {
        dir.command(&[
            "prepare",
            "--dataset",
            "synthetic",
            "--items",
            "300",
            "--users",
            "40",
            "--events",
            "2000",
            "--seed",
            "9",
            "--out",
            out,
        ])
        .ok();
    }
    for f in ["items.parquet", "events.parquet", "splits/train.parquet"] {
        assert_eq!(
            std::fs::read(dir.join("a").join(f)).unwrap(),
            std::fs::read(dir.join("b").join(f)).unwrap(),
            "{f}"
        );
    }
}
