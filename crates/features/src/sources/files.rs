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

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::text::{Dialect, Row, TextTable};
use crate::error::{Error, Result};
use crate::raw::RawData;
use crate::records::{Event, EventType, Item, User};
use crate::table::{read_table, Table};

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
            _ => Err(Error::setting("on-bad-rows", format!("`{s}` is neither `fail` nor `skip`"))),
        }
    }
}

/// Bad rows logged individually before only counting.
const LOGGED_BAD_ROWS: u64 = 10;

/// Loads the user's files. Without a users file every user of the events gets a row without
/// features.
pub fn load_files(items: &Path, events: &Path, users: Option<&Path>, on_bad_rows: BadRows) -> Result<RawData> {
    let items = read_items(items)?;
    let (events, skipped_rows) = read_events(events, on_bad_rows)?;
    let users = match users {
        Some(path) => read_users(path)?,
        None => {
            let ids: BTreeSet<u64> = events.iter().map(|e| e.user_id).collect();
            ids.into_iter().map(|user_id| User { user_id, features: vec![] }).collect()
        }
    };
    Ok(RawData { items, users, events, skipped_rows })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Parquet,
    Csv,
}

fn format_of(path: &Path) -> Result<Format> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "parquet" => Ok(Format::Parquet),
        "csv" => Ok(Format::Csv),
        _ => Err(Error::bad_file(path, format!("unsupported file type `.{ext}`: expected a .parquet or .csv file"))),
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
    if format_of(path)? == Format::Parquet {
        return parquet_rows(path);
    }
    let t = TextTable::open(path, Dialect::Csv)?;
    let (id, title) = (t.column("item_id")?, t.column("title")?);
    let (aspects, categories, created) = (t.optional("aspects"), t.optional("categories"), t.optional("created_at"));
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

fn read_users(path: &Path) -> Result<Vec<User>> {
    if format_of(path)? == Format::Parquet {
        return parquet_rows(path);
    }
    let t = TextTable::open(path, Dialect::Csv)?;
    let (id, features) = (t.column("user_id")?, t.optional("features"));
    let mut users = Vec::new();
    t.for_each_row(|row| {
        let row = row?;
        users.push(User { user_id: row.id(id)?, features: list(&row, features)? });
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
            crate::table::read_events_lenient(path, &mut skip)?.0
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
        let reason = if skipped > 0 { format!("no usable rows: all {skipped} rows are bad") } else { "no rows".to_string() };
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
        row.error(c.event_type, format!("unknown event type `{name}` (expected one of {})", known.join(", ")))
    })?;
    let event = Event {
        user_id: row.id(c.user)?,
        ts_ms: row.opt_time_ms(c.ts)?.ok_or_else(|| row.error(c.ts, "missing value"))?,
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
    crate::table::validate_event(&event).map_err(|(column, reason)| row.error_at(column, reason))?;
    Ok(event)
}
