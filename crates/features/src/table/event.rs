//! The events table: conversion and validation of [`Event`] rows, strict and lenient.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::SchemaRef;

use super::columns::*;
use super::reader::*;
use super::Table;
use crate::error::{Error, Result};
use crate::records::{Event, EventType};
use crate::schema;

impl Table for Event {
    const NAME: &'static str = "events";

    fn schema() -> SchemaRef {
        schema::events_schema()
    }

    fn to_batch(rows: &[Self]) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
        RecordBatch::try_new(
            Self::schema(),
            vec![
                Arc::new(UInt64Array::from_iter_values(
                    rows.iter().map(|r| r.user_id),
                )),
                Arc::new(timestamps(rows.iter().map(|r| Some(r.ts_ms)))),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.event_type.as_str()),
                )),
                Arc::new(UInt64Array::from_iter(rows.iter().map(|r| r.item_id))),
                Arc::new(StringArray::from_iter(
                    rows.iter().map(|r| r.query.as_deref()),
                )),
                Arc::new(arrow::array::Float32Array::from_iter(
                    rows.iter().map(|r| r.value),
                )),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch, file: &Path, first_row: usize) -> Result<Vec<Self>> {
        let c = Columns::new(batch, file, first_row);
        let users = c.u64s("user_id")?;
        let ts = c.timestamps("ts", true)?;
        let types = c.strings("event_type")?;
        let items = c.opt_u64s("item_id")?;
        let queries = c.opt_strings("query")?;
        let values = c.opt_f32s("value")?;
        let mut out = Vec::with_capacity(users.len());
        for i in 0..users.len() {
            let name = types.value(i);
            let event_type = EventType::parse(name).ok_or_else(|| {
                Error::bad_value(
                    file,
                    c.row(i),
                    "event_type",
                    format!("unknown event type `{name}` (expected one of view, search, add_to_cart, watch, purchase, rate)"),
                )
            })?;
            let query = queries
                .as_ref()
                .filter(|q| q.is_valid(i))
                .map(|q| q.value(i).to_string());
            let event = Event {
                user_id: users[i],
                ts_ms: ts[i].expect("checked"),
                event_type,
                item_id: items[i],
                query,
                value: values[i],
            };
            validate_event(&event)
                .map_err(|(column, reason)| Error::bad_value(file, c.row(i), column, reason))?;
            out.push(event);
        }
        Ok(out)
    }
}

/// Checks that an event has what its type needs: an item, or for a search a query.
/// Returns the offending column and the reason.
pub fn validate_event(e: &Event) -> std::result::Result<(), (&'static str, String)> {
    crate::records::check_time_ms(e.ts_ms).map_err(|reason| ("ts", reason))?;
    if let Some(v) = e.value.filter(|v| !v.is_finite()) {
        return Err(("value", format!("{v} is not a finite number")));
    }
    match (e.event_type, e.item_id, e.query.as_deref()) {
        (EventType::Search, Some(_), _) => Err(("item_id", "a search event has no item_id".into())),
        (EventType::Search, None, Some(q)) if !q.trim().is_empty() => Ok(()),
        (EventType::Search, None, _) => {
            Err(("query", "a search event needs a non-empty query".into()))
        }
        (_, Some(_), _) => Ok(()),
        (t, None, _) => Err(("item_id", format!("a `{t}` event needs an item_id"))),
    }
}

/// Reads an events file like [`read_table`], but a row with a bad value (unknown event type,
/// negative or missing timestamp, missing item or query, a number that does not fit) is passed
/// to `on_skip` and left out instead of failing the whole file. File-level problems (not
/// Parquet, a missing column, a column of the wrong type) still fail. Returns the events and
/// the number of rows skipped.
pub fn read_events_lenient(
    path: &Path,
    on_skip: &mut dyn FnMut(&Error),
) -> Result<(Vec<Event>, u64)> {
    // Opening through `TableReader` keeps its schema-version and table-name checks.
    let TableReader { inner, .. } = TableReader::<Event>::open(path)?;
    let (mut events, mut skipped, mut next_row) = (Vec::new(), 0u64, 1usize);
    for batch in inner {
        let batch = batch.map_err(|source| Error::Arrow {
            file: path.to_path_buf(),
            source,
        })?;
        let first = next_row;
        next_row += batch.num_rows();
        if let Ok(rows) = Event::from_batch(&batch, path, first) {
            events.extend(rows);
            continue;
        }
        // Some row is bad: decode row by row (slow, but only for batches with bad rows).
        for i in 0..batch.num_rows() {
            match Event::from_batch(&batch.slice(i, 1), path, first + i) {
                Ok(rows) => events.extend(rows),
                Err(e @ Error::BadValue { .. }) => {
                    on_skip(&e);
                    skipped += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok((events, skipped))
}
