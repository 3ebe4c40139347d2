//! The user's own data: items, events and optionally users, each as Parquet (our schema, see
//! `docs/data.md`) or CSV with the same column names.
//!
//! CSV conventions: a header row; empty cells are nulls; list columns (`aspects`, `categories`,
//! `features`) are `|`-separated; `ts` and `created_at` are integer milliseconds since the Unix
//! epoch or RFC 3339 / ISO 8601 date-times (UTC unless they carry an offset).
//!
//! Real event logs have broken rows; with [`BadRows::Skip`] those are counted and skipped so one
//! bad line does not stop a large import. Items and users are never skipped: a missing item
//! would silently change what can be recommended.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::text::{Dialect, Row, TextTable};
use crate::raw::RawData;
use features::error::{Error, Result};
use features::records::{Event, EventType, Item, User};
use features::table::{read_table, Table};

/// What to do with an event row that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadRows {
    /// Stop at the first bad row, naming file, row and column.
    #[default]
    Fail,
    /// Skip bad event rows and count them in [`RawData::skipped_rows`].
    Skip,
}

impl std::str::FromStr for BadRows {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fail" => Ok(BadRows::Fail),
            "skip" => Ok(BadRows::Skip),
            _ => Err(Error::setting(
                "on-bad-rows",
                format!("`{s}` is neither `fail` nor `skip`"),
            )),
        }
    }
}

/// Bad rows logged individually before only counting.
pub(crate) const LOGGED_BAD_ROWS: u64 = 10;

/// Loads the user's files. Without a users file every user of the events gets a row without
/// features.
pub fn load_files(
    items: &Path,
    events: &Path,
    users: Option<&Path>,
    on_bad_rows: BadRows,
) -> Result<RawData> {
    let items = read_items(items)?;
    let (events, skipped_rows) = read_events(events, on_bad_rows)?;
    let users = match users {
        Some(path) => {
            let users = read_users(path)?;
            warn_about_users_without_rows(path, &users, &events);
            users
        }
        None => {
            let ids: BTreeSet<u64> = events.iter().map(|e| e.user_id).collect();
            ids.into_iter()
                .map(|user_id| User {
                    user_id,
                    features: vec![],
                })
                .collect()
        }
    };
    Ok(RawData {
        items,
        users,
        events,
        skipped_rows,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Parquet,
    Csv,
}

fn format_of(path: &Path) -> Result<Format> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "parquet" => Ok(Format::Parquet),
        "csv" => Ok(Format::Csv),
        _ => Err(Error::bad_file(
            path,
            format!("unsupported file type `.{ext}`: expected a .parquet or .csv file"),
        )),
    }
}

/// A whole Parquet table, which must have rows.
fn parquet_rows<T: Table>(path: &Path) -> Result<Vec<T>> {
    let rows = read_table::<T>(path)?;
    if rows.is_empty() {
        return Err(Error::bad_file(path, "no rows"));
    }
    Ok(rows)
}

fn read_items(path: &Path) -> Result<Vec<Item>> {
    let items = read_item_rows(path)?;
    for (i, item) in items.iter().enumerate() {
        features::table::validate_item(item)
            .map_err(|(column, reason)| Error::bad_value(path, i + 1, column, reason))?;
    }
    Ok(items)
}

fn read_item_rows(path: &Path) -> Result<Vec<Item>> {
    if format_of(path)? == Format::Parquet {
        return parquet_rows(path);
    }
    let t = TextTable::open(path, Dialect::Csv)?;
    let (id, title) = (t.column("item_id")?, t.column("title")?);
    let (aspects, categories, created) = (
        t.optional("aspects"),
        t.optional("categories"),
        t.optional("created_at"),
    );
    let mut items = Vec::new();
    t.for_each_row(|row| {
        let row = row?;
        items.push(Item {
            item_id: row.id(id)?,
            title: row.req(title)?.to_string(),
            aspects: list(&row, aspects)?,
            categories: list(&row, categories)?,
            created_at_ms: match created {
                Some(c) => row.opt_time_ms(c)?,
                None => None,
            },
        });
        Ok(())
    })?;
    Ok(items)
}

/// Users of the events missing from the users file are kept, without features; a warning says
/// how many, since it usually means the wrong users file.
fn warn_about_users_without_rows(path: &Path, users: &[User], events: &[Event]) {
    let listed: HashSet<u64> = users.iter().map(|u| u.user_id).collect();
    let missing: BTreeSet<u64> = events
        .iter()
        .map(|e| e.user_id)
        .filter(|u| !listed.contains(u))
        .collect();
    if let Some(first) = missing.first() {
        tracing::warn!(
            file = %path.display(),
            users = missing.len(),
            first,
            "users of the events have no row in the users file; they are kept without features"
        );
    }
}

fn read_users(path: &Path) -> Result<Vec<User>> {
    let users = read_user_rows(path)?;
    crate::prepare::unique_ids(users.iter().map(|u| u.user_id), path, "user_id")?;
    Ok(users)
}

fn read_user_rows(path: &Path) -> Result<Vec<User>> {
    if format_of(path)? == Format::Parquet {
        return parquet_rows(path);
    }
    let t = TextTable::open(path, Dialect::Csv)?;
    let (id, features) = (t.column("user_id")?, t.optional("features"));
    let mut users = Vec::new();
    t.for_each_row(|row| {
        let row = row?;
        users.push(User {
            user_id: row.id(id)?,
            features: list(&row, features)?,
        });
        Ok(())
    })?;
    Ok(users)
}

fn list(row: &Row<'_>, col: Option<usize>) -> Result<Vec<String>> {
    col.map_or(Ok(Vec::new()), |c| row.list(c))
}

/// Events and the number of rows skipped.
fn read_events(path: &Path, on_bad_rows: BadRows) -> Result<(Vec<Event>, u64)> {
    let mut skipped = 0u64;
    let mut skip = |e: &Error| {
        skipped += 1;
        if skipped <= LOGGED_BAD_ROWS {
            tracing::warn!("skipping bad event row: {e}");
        }
    };
    let events = match (format_of(path)?, on_bad_rows) {
        (Format::Parquet, BadRows::Fail) => return Ok((parquet_rows(path)?, 0)),
        (Format::Parquet, BadRows::Skip) => {
            features::table::read_events_lenient(path, &mut skip)?.0
        }
        (Format::Csv, _) => {
            let t = TextTable::open(path, Dialect::Csv)?;
            let cols = EventColumns {
                user: t.column("user_id")?,
                ts: t.column("ts")?,
                event_type: t.column("event_type")?,
                item: t.optional("item_id"),
                query: t.optional("query"),
                value: t.optional("value"),
            };
            let mut events = Vec::new();
            t.for_each_row(|row| {
                match (row.and_then(|row| event(&row, &cols)), on_bad_rows) {
                    (Ok(e), _) => events.push(e),
                    (Err(e), BadRows::Skip) if matches!(e, Error::BadValue { .. }) => skip(&e),
                    (Err(e), _) => return Err(e),
                }
                Ok(())
            })?;
            events
        }
    };
    if skipped > 0 {
        tracing::warn!("{}: skipped {skipped} bad event rows", path.display());
    }
    if events.is_empty() {
        let reason = if skipped > 0 {
            format!("no usable rows: all {skipped} rows are bad")
        } else {
            "no rows".to_string()
        };
        return Err(Error::bad_file(path, reason));
    }
    Ok((events, skipped))
}

struct EventColumns {
    user: usize,
    ts: usize,
    event_type: usize,
    item: Option<usize>,
    query: Option<usize>,
    value: Option<usize>,
}

fn event(row: &Row<'_>, c: &EventColumns) -> Result<Event> {
    let name = row.req(c.event_type)?;
    let event_type = EventType::parse(name).ok_or_else(|| {
        let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        row.error(
            c.event_type,
            format!(
                "unknown event type `{name}` (expected one of {})",
                known.join(", ")
            ),
        )
    })?;
    let event = Event {
        user_id: row.id(c.user)?,
        ts_ms: row
            .opt_time_ms(c.ts)?
            .ok_or_else(|| row.error(c.ts, "missing value"))?,
        event_type,
        item_id: match c.item {
            Some(col) if row.opt(col)?.is_some() => Some(row.id(col)?),
            _ => None,
        },
        query: match c.query {
            Some(col) => row.opt(col)?.map(str::to_string),
            None => None,
        },
        value: match c.value {
            Some(col) => row.opt_number::<f32>(col)?,
            None => None,
        },
    };
    features::table::validate_event(&event)
        .map_err(|(column, reason)| row.error_at(column, reason))?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;

    use super::*;
    use features::table::write_table;

    fn expected() -> RawData {
        let item =
            |item_id, title: &str, aspects: &[&str], categories: &[&str], created_at_ms| Item {
                item_id,
                title: title.into(),
                aspects: aspects.iter().map(|s| s.to_string()).collect(),
                categories: categories.iter().map(|s| s.to_string()).collect(),
                created_at_ms,
            };
        let event = |user_id, ts_ms, event_type, item_id, query: Option<&str>, value| Event {
            user_id,
            ts_ms,
            event_type,
            item_id,
            query: query.map(str::to_string),
            value,
        };
        RawData {
            items: vec![
                item(
                    1,
                    "Red shoe, size 9",
                    &["color:red", "size:9"],
                    &["shoes", "men"],
                    Some(1_704_067_200_000),
                ),
                item(2, "Hat", &[], &[], None),
            ],
            users: vec![
                User {
                    user_id: 7,
                    features: vec!["age:25-34".into(), "gender:f".into()],
                },
                User {
                    user_id: 8,
                    features: vec![],
                },
            ],
            events: vec![
                event(
                    7,
                    1_704_067_200_000,
                    EventType::Search,
                    None,
                    Some("red shoes"),
                    None,
                ),
                event(7, 1_704_067_260_500, EventType::View, Some(1), None, None),
                event(
                    8,
                    1_704_070_800_000,
                    EventType::Purchase,
                    Some(2),
                    None,
                    Some(2.0),
                ),
            ],
            skipped_rows: 0,
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const ITEMS: &str = "item_id,title,aspects,categories,created_at\n\
        1,\"Red shoe, size 9\",color:red|size:9,shoes|men,2024-01-01T00:00:00Z\n\
        2,Hat,,,\n";
    const USERS: &str = "user_id,features\n7,age:25-34|gender:f\n8,\n";
    const EVENTS: &str = "user_id,ts,event_type,item_id,query,value\n\
        7,1704067200000,search,,red shoes,\n\
        7,2024-01-01T00:01:00.5Z,view,1,,\n\
        8,2024-01-01T02:00:00+01:00,purchase,2,,2\n";

    fn load(dir: &Path, items: &str, events: &str, on_bad_rows: BadRows) -> Result<RawData> {
        let users = write(dir, "users.csv", USERS);
        load_files(
            &write(dir, "items.csv", items),
            &write(dir, "events.csv", events),
            Some(&users),
            on_bad_rows,
        )
    }

    fn assert_same(a: &RawData, b: &RawData) {
        assert_eq!(
            (&a.items, &a.users, &a.events, a.skipped_rows),
            (&b.items, &b.users, &b.events, b.skipped_rows)
        );
    }

    /// The error names the file, the row (when given) and the column.
    fn assert_names(err: Error, file: &str, row: Option<usize>, column: &str) {
        let msg = err.to_string();
        assert!(
            msg.contains(file) && msg.contains(&format!("`{column}`")),
            "{msg}"
        );
        if let Some(row) = row {
            assert!(
                matches!(err, Error::BadValue { row: r, .. } if r == row),
                "{msg}"
            );
        }
    }

    #[test]
    fn csv_and_parquet_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let want = expected();
        assert_same(
            &load(dir.path(), ITEMS, EVENTS, BadRows::Fail).unwrap(),
            &want,
        );

        let p = |n: &str| dir.path().join(n);
        write_table(&p("items.parquet"), &want.items).unwrap();
        write_table(&p("users.parquet"), &want.users).unwrap();
        write_table(&p("events.parquet"), &want.events).unwrap();
        for mode in [BadRows::Fail, BadRows::Skip] {
            let got = load_files(
                &p("items.parquet"),
                &p("events.parquet"),
                Some(&p("users.parquet")),
                mode,
            )
            .unwrap();
            assert_same(&got, &want);
        }
        // Without a users file, every user of the events gets an empty profile.
        let got = load_files(
            &p("items.parquet"),
            &p("events.parquet"),
            None,
            BadRows::Fail,
        )
        .unwrap();
        assert_eq!(
            got.users,
            [
                User {
                    user_id: 7,
                    features: vec![]
                },
                User {
                    user_id: 8,
                    features: vec![]
                }
            ]
        );
    }

    #[test]
    fn ids_an_index_cannot_hold_and_times_in_the_wrong_unit_are_refused_at_their_row() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let items = "item_id,title\n1,Shoe\n9223372036854775808,Hat\n";
        assert_names(
            load(d, items, EVENTS, BadRows::Fail).unwrap_err(),
            "items.csv",
            Some(2),
            "item_id",
        );
        // Nanoseconds since 1970 are no millisecond date; the year 9999 is.
        let events = "user_id,ts,event_type,item_id,query,value\n7,1704067200000000000,view,1,,\n";
        let err = load(d, ITEMS, events, BadRows::Fail).unwrap_err();
        assert!(err.to_string().contains("nanoseconds"), "{err}");
        assert_names(err, "events.csv", Some(1), "ts");
        let events = "user_id,ts,event_type,item_id,query,value\n7,1704067200000,purchase,1,,NaN\n";
        assert_names(
            load(d, ITEMS, events, BadRows::Fail).unwrap_err(),
            "events.csv",
            Some(1),
            "value",
        );
        let items = "item_id,title,created_at\n1,Shoe,9999-12-31\n2,Hat,3000-01-01T00:00:00Z\n";
        let raw = load(d, items, EVENTS, BadRows::Fail).unwrap();
        assert_eq!(raw.items[1].created_at_ms, Some(32_503_680_000_000));
        // A duplicate user is named in the users file itself.
        let users = write(d, "users.csv", "user_id\n7\n8\n7\n");
        let err = load_files(
            &write(d, "items.csv", ITEMS),
            &write(d, "events.csv", EVENTS),
            Some(&users),
            BadRows::Fail,
        )
        .unwrap_err();
        assert_names(err, "users.csv", Some(3), "user_id");
    }

    #[test]
    fn bad_csv_rows_name_file_row_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let bad_event =
            |row: &str| format!("user_id,ts,event_type,item_id,query,value\n7,5,view,1,,\n{row}\n");
        let cases = [
            (bad_event("7,5,click,1,,"), Some(2), "event_type"),
            (bad_event("7,-5,view,1,,"), Some(2), "ts"),
            (bad_event("7,yesterday,view,1,,"), Some(2), "ts"),
            (bad_event("7,5,view,,,"), Some(2), "item_id"),
            (bad_event("7,5,search,,,"), Some(2), "query"),
            (bad_event("7,5,purchase,1,,lots"), Some(2), "value"),
            (bad_event("x7,5,view,1,,"), Some(2), "user_id"),
            (bad_event("7,5,view"), Some(2), "item_id"),
            (
                "user_id,event_type,item_id\n7,view,1\n".to_string(),
                None,
                "ts",
            ),
        ];
        for (events, row, column) in cases {
            assert_names(
                load(d, ITEMS, &events, BadRows::Fail).unwrap_err(),
                "events.csv",
                row,
                column,
            );
        }
        let items = "item_id,title\n1,Shoe\nabc,Hat\n";
        assert_names(
            load(d, items, EVENTS, BadRows::Fail).unwrap_err(),
            "items.csv",
            Some(2),
            "item_id",
        );
        let items = "item_id,title\n1,Shoe\n2,\n";
        assert_names(
            load(d, items, EVENTS, BadRows::Fail).unwrap_err(),
            "items.csv",
            Some(2),
            "title",
        );
        assert_names(
            load(d, "item_id\n1\n", EVENTS, BadRows::Fail).unwrap_err(),
            "items.csv",
            None,
            "title",
        );
    }

    #[test]
    fn empty_and_unknown_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for events in ["", "user_id,ts,event_type,item_id,query,value\n"] {
            let msg = load(d, ITEMS, events, BadRows::Fail)
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("events.csv") && msg.contains("no rows"),
                "{msg}"
            );
        }
        write_table::<Item>(&d.join("items.parquet"), &[]).unwrap();
        let events = write(d, "events.csv", EVENTS);
        let msg = load_files(&d.join("items.parquet"), &events, None, BadRows::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("items.parquet") && msg.contains("no rows"),
            "{msg}"
        );
        let json = write(d, "items.json", "[]");
        let msg = load_files(&json, &events, None, BadRows::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("items.json") && msg.contains(".parquet or .csv"),
            "{msg}"
        );
    }

    #[test]
    fn skip_counts_and_skips_bad_csv_event_rows_but_never_items() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let events = format!("{EVENTS}7,5,click,1,,\n7,-5,view,1,,\n7,soon,view,1,,\n7,5,view\n");
        let got = load(d, ITEMS, &events, BadRows::Skip).unwrap();
        assert_eq!((got.events, got.skipped_rows), (expected().events, 4));
        let msg = load(
            d,
            ITEMS,
            "user_id,ts,event_type\n7,5,click\n",
            BadRows::Skip,
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("no usable rows") && msg.contains('1'), "{msg}");
        let items = "item_id,title\nabc,Hat\n";
        assert_names(
            load(d, items, EVENTS, BadRows::Skip).unwrap_err(),
            "items.csv",
            Some(1),
            "item_id",
        );
    }

    /// An events file as a user's tool might write it: plain Int64 columns, free-form types.
    fn raw_events_parquet(path: &Path, ts: ArrayRef, types: Vec<&str>, items: Vec<Option<i64>>) {
        let n = types.len();
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Int64, false),
            Field::new("ts", ts.data_type().clone(), true),
            Field::new("event_type", DataType::Utf8, false),
            Field::new("item_id", DataType::Int64, true),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![7; n])),
            ts,
            Arc::new(StringArray::from(types)),
            Arc::new(Int64Array::from(items)),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn bad_parquet_event_rows_fail_or_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (items, path) = (
            dir.path().join("items.parquet"),
            dir.path().join("events.parquet"),
        );
        write_table(&items, &expected().items).unwrap();
        let ts: ArrayRef = Arc::new(Int64Array::from(vec![5, 6, -7, 8, 9]));
        raw_events_parquet(
            &path,
            ts,
            vec!["view", "click", "view", "view", "rate"],
            vec![Some(1), Some(1), Some(1), None, Some(-2)],
        );
        let err = load_files(&items, &path, None, BadRows::Fail).unwrap_err();
        // Parquet is checked column by column: the negative time (row 3) is found first.
        assert_names(err, "events.parquet", Some(3), "ts");
        let got = load_files(&items, &path, None, BadRows::Skip).unwrap();
        assert_eq!(got.skipped_rows, 4);
        assert_eq!(got.events.len(), 1);
        assert_eq!((got.events[0].ts_ms, got.events[0].item_id), (5, Some(1)));

        // A column of the wrong type is a file error even when skipping.
        let ts: ArrayRef = Arc::new(StringArray::from(vec!["monday"]));
        raw_events_parquet(&path, ts, vec!["view"], vec![Some(1)]);
        for mode in [BadRows::Fail, BadRows::Skip] {
            assert_names(
                load_files(&items, &path, None, mode).unwrap_err(),
                "events.parquet",
                None,
                "ts",
            );
        }
    }
}
