//! `twotower prepare`: validated tables, leak-free splits and vocabularies in one directory.
//!
//! Everything is written into a temporary directory beside `DATA_DIR` and renamed into place at
//! the end, so a failed or interrupted run never leaves a half-written dataset where a later
//! stage could read it.
//!
//! Output layout (see `docs/data.md`):
//! `items.parquet`, `users.parquet`, `events.parquet`, `splits/{train,valid,test}.parquet`,
//! `vocab/*.json`, `dataset.json`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::dataset_writer::DatasetWriter;
use crate::raw::RawData;
use crate::sources::files::LOGGED_BAD_ROWS;
use crate::sources::BadRows;
use features::error::{Error, Result};
pub use features::layout::{Counts, DataLayout, DatasetInfo, PrepareConfig, Provenance};
use features::progress::Progress;
use features::records::{Event, Item, User};
use features::splits::{self, SplitConfig, SplitStrategy};
use features::table::ROW_GROUP_ROWS;

/// Prepares a dataset held in memory (every source but the synthetic generator).
pub fn prepare_raw(
    raw: RawData,
    provenance: Provenance,
    out: &Path,
    cfg: &PrepareConfig,
    on_bad_rows: BadRows,
    progress: &dyn Progress,
) -> Result<DatasetInfo> {
    cfg.validate()?;
    let started = std::time::Instant::now();
    let RawData {
        items,
        users,
        mut events,
        skipped_rows,
    } = raw;
    let item_ids = validate_items(&items, &provenance.items_label)?;
    let mut skipped = skipped_rows;
    validate_event_items(
        &mut events,
        &item_ids,
        &provenance.events_label,
        on_bad_rows,
        &mut skipped,
    )?;
    let mut cfg = cfg.clone();
    resolve_time_split(&mut cfg.split, &events)?;

    let features: HashMap<u64, Vec<String>> = users_by_id(users, &provenance)?;
    progress.start("sorting events", None);
    // Stable: each user's events keep the source order, which `TieOrder::Source` relies on.
    events.sort_by_key(|e| e.user_id);
    progress.finish();

    let ties = cfg.split.ties;
    let mut writer = DatasetWriter::create(out, cfg, provenance)?;
    writer.counts.skipped_rows = skipped;
    progress.start("writing items", Some(items.len() as u64));
    writer.add_items(&items)?;
    progress.finish();
    progress.start("building examples", Some(events.len() as u64));
    // Users with features but no events still belong in users.parquet.
    let mut user_ids: Vec<u64> = features
        .keys()
        .copied()
        .chain(events.iter().map(|e| e.user_id))
        .collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    let mut rest = &mut events[..];
    for user_id in user_ids {
        let n = rest.iter().take_while(|e| e.user_id == user_id).count();
        let (mine, tail) = rest.split_at_mut(n);
        rest = tail;
        splits::sort_user_events(mine, ties);
        let user = User {
            user_id,
            features: features.get(&user_id).cloned().unwrap_or_default(),
        };
        writer.add_user(&user, mine)?;
        progress.advance(n as u64);
    }
    progress.finish();
    writer.finish(items.into_iter(), started, progress)
}

/// Prepares a dataset from streams: items, then users one at a time with their events sorted
/// by [`splits::sort_user_events`]. Memory stays bounded by one user plus the item-id set.
/// `items` is called twice: once to write the catalog, once to build the vocabularies.
pub fn prepare_streaming<I, U>(
    items: impl Fn() -> I,
    users: U,
    provenance: Provenance,
    out: &Path,
    cfg: &PrepareConfig,
    progress: &dyn Progress,
) -> Result<DatasetInfo>
where
    I: Iterator<Item = Item>,
    U: Iterator<Item = (User, Vec<Event>)>,
{
    cfg.validate()?;
    let started = std::time::Instant::now();
    match cfg.split.strategy {
        SplitStrategy::Time {
            test_cutoff_ms: None,
            ..
        } => {
            return Err(Error::setting(
                "test-cutoff",
                "a time split of streamed data needs an explicit test cutoff",
            ));
        }
        SplitStrategy::Time {
            cutoff_ms,
            test_cutoff_ms: Some(test),
        } if test < cutoff_ms => {
            return Err(Error::setting("test-cutoff", "must not be before --cutoff"));
        }
        _ => {}
    }
    let mut writer = DatasetWriter::create(out, cfg.clone(), provenance.clone())?;
    progress.start("writing items", None);
    let mut ids = HashSet::new();
    let mut chunk = Vec::with_capacity(ROW_GROUP_ROWS);
    for (row, item) in items().enumerate() {
        if !ids.insert(item.item_id) {
            return Err(Error::bad_value(
                &provenance.items_label,
                row + 1,
                "item_id",
                format!("duplicate item_id {}", item.item_id),
            ));
        }
        chunk.push(item);
        if chunk.len() == ROW_GROUP_ROWS {
            writer.add_items(&chunk)?;
            progress.advance(chunk.len() as u64);
            chunk.clear();
        }
    }
    writer.add_items(&chunk)?;
    progress.finish();
    if ids.is_empty() {
        return Err(Error::bad_file(&provenance.items_label, "no items"));
    }
    progress.start("building examples", None);
    for (user, mut events) in users {
        for (i, e) in events.iter().enumerate() {
            check_event_item(e, &ids, &provenance.events_label, i + 1)?;
        }
        splits::sort_user_events(&mut events, cfg.split.ties);
        writer.add_user(&user, &events)?;
        progress.advance(events.len() as u64);
    }
    progress.finish();
    writer.finish(items(), started, progress)
}

fn validate_items(items: &[Item], label: &Path) -> Result<HashSet<u64>> {
    if items.is_empty() {
        return Err(Error::bad_file(label, "no items"));
    }
    unique_ids(items.iter().map(|i| i.item_id), label, "item_id")
}

/// The ids of a table's rows, or an error naming the first one repeated, by row (1-based) in
/// `label` and `column`.
pub(crate) fn unique_ids(
    ids: impl ExactSizeIterator<Item = u64>,
    label: &Path,
    column: &str,
) -> Result<HashSet<u64>> {
    let mut first_row = HashMap::with_capacity(ids.len());
    for (i, id) in ids.enumerate() {
        if let Some(prev) = first_row.insert(id, i + 1) {
            return Err(Error::bad_value(
                label,
                i + 1,
                column,
                format!("duplicate {column} {id} (first seen in row {prev})"),
            ));
        }
    }
    Ok(first_row.into_keys().collect())
}

fn check_event_item(e: &Event, ids: &HashSet<u64>, label: &Path, row: usize) -> Result<()> {
    if let Err((column, reason)) = features::table::validate_event(e) {
        return Err(Error::bad_value(label, row, column, reason));
    }
    match e.item_id {
        Some(id) if !ids.contains(&id) => Err(Error::bad_value(
            label,
            row,
            "item_id",
            format!("event points at unknown item {id}"),
        )),
        _ => Ok(()),
    }
}

fn validate_event_items(
    events: &mut Vec<Event>,
    ids: &HashSet<u64>,
    label: &Path,
    on_bad_rows: BadRows,
    skipped: &mut u64,
) -> Result<()> {
    if events.is_empty() {
        return Err(Error::bad_file(label, "no events"));
    }
    let mut row = 0usize;
    let mut first_error = None;
    let mut dropped = 0u64;
    events.retain(|e| {
        row += 1;
        match check_event_item(e, ids, label, row) {
            Ok(()) => true,
            Err(err) => {
                dropped += 1;
                if on_bad_rows == BadRows::Skip && dropped <= LOGGED_BAD_ROWS {
                    tracing::warn!(error = %err, "skipping a bad event row");
                }
                first_error.get_or_insert(err);
                false
            }
        }
    });
    *skipped += dropped;
    match (on_bad_rows, first_error) {
        (BadRows::Fail, Some(err)) => Err(err),
        (BadRows::Skip, _) if events.is_empty() => Err(Error::bad_file(label, "no valid events")),
        _ => Ok(()),
    }
}

fn users_by_id(users: Vec<User>, provenance: &Provenance) -> Result<HashMap<u64, Vec<String>>> {
    let mut out = HashMap::with_capacity(users.len());
    for (i, user) in users.into_iter().enumerate() {
        if out.insert(user.user_id, user.features).is_some() {
            return Err(Error::bad_value(
                format!("{} (users)", provenance.source),
                i + 1,
                "user_id",
                format!("duplicate user_id {}", user.user_id),
            ));
        }
    }
    Ok(out)
}

fn resolve_time_split(split: &mut SplitConfig, events: &[Event]) -> Result<()> {
    if let SplitStrategy::Time {
        cutoff_ms,
        test_cutoff_ms,
    } = &mut split.strategy
    {
        let max_ts = events.iter().map(|e| e.ts_ms).max().unwrap_or(0);
        let min_ts = events.iter().map(|e| e.ts_ms).min().unwrap_or(0);
        if *cutoff_ms <= min_ts || *cutoff_ms > max_ts {
            return Err(Error::setting(
                "cutoff",
                format!("{cutoff_ms} ms is outside the events' time range [{min_ts}, {max_ts}]"),
            ));
        }
        let test = test_cutoff_ms.get_or_insert(*cutoff_ms + (max_ts - *cutoff_ms) / 2);
        if *test < *cutoff_ms {
            return Err(Error::setting("test-cutoff", "must not be before --cutoff"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::synthetic::{SyntheticConfig, SyntheticGenerator};
    use features::progress::NoProgress;
    use features::records::{EventType, Example};
    use features::splits::Split;
    use features::table::read_table;

    fn provenance() -> Provenance {
        Provenance {
            source: "test".into(),
            detail: String::new(),
            items_label: "items.csv".into(),
            events_label: "events.csv".into(),
        }
    }

    fn synthetic(dir: &Path, cfg: &PrepareConfig) -> (DatasetInfo, SyntheticGenerator) {
        let generator = SyntheticGenerator::new(SyntheticConfig {
            items: 800,
            users: 150,
            events: 9_000,
            ..Default::default()
        })
        .unwrap();
        let info = prepare_streaming(
            || generator.items(),
            generator.users(),
            provenance(),
            dir,
            cfg,
            &NoProgress,
        )
        .unwrap();
        (info, generator)
    }

    fn examples(dir: &Path, split: Split) -> Vec<Example> {
        read_table(&DataLayout(dir.to_path_buf()).split(split)).unwrap()
    }

    #[test]
    fn no_history_event_is_at_or_after_its_target_and_test_events_never_train() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let (info, _) = synthetic(&dir, &PrepareConfig::default());
        assert!(
            info.counts.train > 1000 && info.counts.test > 100,
            "{:?}",
            info.counts
        );
        let events: Vec<Event> = read_table(&DataLayout(dir.clone()).events()).unwrap();
        let mut by_user: HashMap<u64, Vec<&Event>> = HashMap::new();
        for e in &events {
            by_user.entry(e.user_id).or_default().push(e);
        }
        let test = examples(&dir, Split::Test);
        let test_of: HashMap<u64, (i64, u64)> = test
            .iter()
            .map(|e| (e.user_id, (e.ts_ms, e.target_item_id)))
            .collect();
        assert_eq!(test_of.len(), test.len(), "one test example per user");
        for split in Split::ALL {
            for ex in examples(&dir, split) {
                // History is strictly before the target: positive gaps and real earlier events.
                for h in &ex.history {
                    assert!(h.gap_s >= 0);
                    let ts = ex.ts_ms - h.gap_s * 1000;
                    let earlier = by_user[&ex.user_id].iter().any(|e| {
                        e.item_id == h.item_id && e.ts_ms < ex.ts_ms && e.ts_ms <= ts + 999
                    });
                    assert!(
                        earlier,
                        "history event not found strictly before target: {h:?} in {ex:?}"
                    );
                }
                assert!(ex.history.len() <= 50);
                let Some(&(test_ts, test_item)) = test_of.get(&ex.user_id) else {
                    continue;
                };
                if split != Split::Test {
                    assert!(
                        (ex.ts_ms, ex.target_item_id) != (test_ts, test_item),
                        "test target reused in {split:?}"
                    );
                    assert!(
                        ex.ts_ms <= test_ts,
                        "{split:?} example after the user's test target"
                    );
                }
            }
        }
        // Test examples' histories never contain the test event itself.
        for ex in &test {
            assert!(ex
                .history
                .iter()
                .all(|h| h.gap_s > 0 || h.item_id != Some(ex.target_item_id)));
        }
    }

    #[test]
    fn ml_100k_has_one_valid_and_one_test_example_per_user() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = crate::sources::Source::Ml100k.load(&NoProgress).unwrap();
        let prov = Provenance {
            source: "ml-100k".into(),
            detail: String::new(),
            items_label: "i".into(),
            events_label: "e".into(),
        };
        let info = prepare_raw(
            raw,
            prov,
            &tmp.path().join("d"),
            &PrepareConfig::default(),
            BadRows::Fail,
            &NoProgress,
        )
        .unwrap();
        let c = &info.counts;
        assert_eq!((c.users, c.items, c.events), (943, 1682, 100_000));
        assert_eq!((c.valid, c.test, c.train), (943, 943, 100_000 - 2 * 943));
        let test = examples(&tmp.path().join("d"), Split::Test);
        let users: HashSet<u64> = test.iter().map(|e| e.user_id).collect();
        assert_eq!(users.len(), 943);
        let mean = test.iter().map(|e| e.history.len()).sum::<usize>() as f64 / test.len() as f64;
        assert!(
            mean > 40.0,
            "test histories are filled up to L = 50: mean {mean}"
        );
    }

    #[test]
    fn same_seed_gives_identical_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        synthetic(&a, &PrepareConfig::default());
        synthetic(&b, &PrepareConfig::default());
        for f in [
            "items.parquet",
            "events.parquet",
            "splits/train.parquet",
            "splits/test.parquet",
            "vocab/title.json",
        ] {
            assert_eq!(
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(b.join(f)).unwrap(),
                "{f}"
            );
        }
    }

    #[test]
    fn cold_items_are_held_out_of_training_and_vocabulary_counts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let cfg = PrepareConfig {
            split: SplitConfig {
                cold_items: 0.2,
                ..Default::default()
            },
            ..Default::default()
        };
        let (info, _) = synthetic(&dir, &cfg);
        assert!(
            info.counts.cold_items > 100 && info.counts.cold_targets > 0,
            "{:?}",
            info.counts
        );
        for ex in examples(&dir, Split::Train) {
            assert!(!cfg.split.is_cold(ex.target_item_id));
            assert!(ex
                .history
                .iter()
                .all(|h| !h.item_id.is_some_and(|i| cfg.split.is_cold(i))));
        }
    }

    fn item(id: u64) -> Item {
        Item {
            item_id: id,
            title: format!("thing {id}"),
            aspects: vec![],
            categories: vec!["c".into()],
            created_at_ms: None,
        }
    }

    fn event(user: u64, ts: i64, item: u64) -> Event {
        Event {
            user_id: user,
            ts_ms: ts,
            event_type: EventType::View,
            item_id: Some(item),
            query: None,
            value: None,
        }
    }

    fn raw() -> RawData {
        RawData {
            items: (1..=5).map(item).collect(),
            users: vec![],
            events: (0..20)
                .map(|i| event(1 + i % 3, 1000 * i as i64, 1 + i % 5))
                .collect(),
            skipped_rows: 0,
        }
    }

    fn prepare_err(raw: RawData, out: &Path, on_bad_rows: BadRows) -> String {
        prepare_raw(
            raw,
            provenance(),
            out,
            &PrepareConfig::default(),
            on_bad_rows,
            &NoProgress,
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn duplicate_items_unknown_items_and_empty_inputs_are_named_errors_leaving_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("data");
        let mut dup = raw();
        dup.items.push(item(3));
        let err = prepare_err(dup, &out, BadRows::Fail);
        assert!(
            err.contains("items.csv")
                && err.contains("row 6")
                && err.contains("item_id")
                && err.contains("duplicate"),
            "{err}"
        );

        let mut unknown = raw();
        unknown.events[4].item_id = Some(99);
        let err = prepare_err(unknown.clone(), &out, BadRows::Fail);
        assert!(
            err.contains("events.csv") && err.contains("row 5") && err.contains("unknown item 99"),
            "{err}"
        );

        let err = prepare_err(
            RawData {
                items: vec![],
                ..raw()
            },
            &out,
            BadRows::Fail,
        );
        assert!(err.contains("no items"), "{err}");
        let err = prepare_err(
            RawData {
                events: vec![],
                ..raw()
            },
            &out,
            BadRows::Fail,
        );
        assert!(err.contains("no events"), "{err}");
        // Nothing was written: no output directory and no temporary directory.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

        // Skipping counts the bad row and carries on.
        let info = prepare_raw(
            unknown,
            provenance(),
            &out,
            &PrepareConfig::default(),
            BadRows::Skip,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(info.counts.skipped_rows, 1);
        assert_eq!(info.counts.events, 19);
    }

    fn prepare_into(out: &Path, raw: RawData) -> Result<DatasetInfo> {
        prepare_raw(
            raw,
            provenance(),
            out,
            &PrepareConfig::default(),
            BadRows::Fail,
            &NoProgress,
        )
    }

    #[test]
    fn prepare_into_a_folder_of_the_users_own_files_refuses_and_deletes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("mydata");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("items.csv"), "item_id,title\n").unwrap();
        let err = prepare_into(&out, raw()).unwrap_err().to_string();
        assert!(
            err.contains("out") && err.contains("mydata") && err.contains("not empty"),
            "{err}"
        );
        assert!(out.join("items.csv").exists());
        // A file as --out is refused before anything is moved.
        let file = tmp.path().join("afile");
        std::fs::write(&file, "precious").unwrap();
        let err = prepare_into(&file, raw()).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
        // An empty directory and an earlier dataset are fine.
        std::fs::remove_file(out.join("items.csv")).unwrap();
        prepare_into(&out, raw()).unwrap();
        prepare_into(&out, raw()).unwrap();
        let names: HashSet<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, HashSet::from(["mydata".into(), "afile".into()]));
    }

    #[test]
    fn a_failed_or_killed_prepare_leaves_no_staging_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("data");
        // What a killed run left (its process is gone), and one of a live run.
        let killed = tmp.path().join(".data.tmp-4294967295");
        std::fs::create_dir_all(killed.join("splits")).unwrap();
        let live = tmp
            .path()
            .join(format!(".data.tmp-{}", std::os::unix::process::parent_id()));
        std::fs::create_dir(&live).unwrap();
        // Only searches: no item to train on, found after the staging began.
        let mut searches = raw();
        for e in &mut searches.events {
            e.event_type = EventType::Search;
            e.item_id = None;
            e.query = Some("red shoes".into());
        }
        let err = prepare_into(&out, searches).unwrap_err().to_string();
        assert!(err.contains("no training examples"), "{err}");
        assert!(
            !killed.exists(),
            "a killed run's staging directory is removed"
        );
        assert!(
            live.exists(),
            "a live run's staging directory is left alone"
        );
        std::fs::remove_dir(&live).unwrap();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn rerun_replaces_the_dataset_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("data");
        prepare_raw(
            raw(),
            provenance(),
            &out,
            &PrepareConfig::default(),
            BadRows::Fail,
            &NoProgress,
        )
        .unwrap();
        let mut fewer = raw();
        fewer.events.truncate(10);
        let info = prepare_raw(
            fewer,
            provenance(),
            &out,
            &PrepareConfig::default(),
            BadRows::Fail,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(DatasetInfo::load(&out).unwrap().counts, info.counts);
        let names: HashSet<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, HashSet::from(["data".to_string()]));
    }

    #[test]
    fn time_split_rejects_a_cutoff_outside_the_data() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = PrepareConfig {
            split: SplitConfig {
                strategy: SplitStrategy::Time {
                    cutoff_ms: 10_000_000,
                    test_cutoff_ms: None,
                },
                ..Default::default()
            },
            ..Default::default()
        };
        let err = prepare_raw(
            raw(),
            provenance(),
            &tmp.path().join("d"),
            &cfg,
            BadRows::Fail,
            &NoProgress,
        )
        .unwrap_err();
        assert!(err.to_string().contains("cutoff"), "{err}");
        let cfg = PrepareConfig {
            split: SplitConfig {
                strategy: SplitStrategy::Time {
                    cutoff_ms: 10_000,
                    test_cutoff_ms: Some(12_500),
                },
                ..Default::default()
            },
            ..Default::default()
        };
        let info = prepare_raw(
            raw(),
            provenance(),
            &tmp.path().join("d"),
            &cfg,
            BadRows::Fail,
            &NoProgress,
        )
        .unwrap();
        assert!(
            info.counts.train > 0 && info.counts.valid > 0 && info.counts.test > 0,
            "{:?}",
            info.counts
        );
    }
}
