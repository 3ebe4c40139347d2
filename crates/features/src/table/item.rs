//! The items table: conversion and validation of [`Item`] rows.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::SchemaRef;

use super::columns::*;
use super::Table;
use crate::error::Result;
use crate::records::Item;
use crate::schema;

impl Table for Item {
    const NAME: &'static str = "items";

    fn schema() -> SchemaRef {
        schema::items_schema()
    }

    fn to_batch(rows: &[Self]) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
        RecordBatch::try_new(
            Self::schema(),
            vec![
                Arc::new(UInt64Array::from_iter_values(
                    rows.iter().map(|r| r.item_id),
                )),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.title))),
                Arc::new(string_list_array(rows.iter().map(|r| &r.aspects))),
                Arc::new(string_list_array(rows.iter().map(|r| &r.categories))),
                Arc::new(timestamps(rows.iter().map(|r| r.created_at_ms))),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch, file: &Path, first_row: usize) -> Result<Vec<Self>> {
        let c = Columns::new(batch, file, first_row);
        let ids = c.u64s("item_id")?;
        let titles = c.strings("title")?;
        let aspects = c.string_lists("aspects", false)?;
        let categories = c.string_lists("categories", false)?;
        let created = c.timestamps("created_at", false)?;
        Ok(ids
            .into_iter()
            .zip(aspects)
            .zip(categories)
            .zip(created)
            .enumerate()
            .map(
                |(i, (((item_id, aspects), categories), created_at_ms))| Item {
                    item_id,
                    title: titles.value(i).to_string(),
                    aspects,
                    categories,
                    created_at_ms,
                },
            )
            .collect())
    }
}

/// The largest item id an index can hold (FAISS ids are `i64`, and -1 means "none").
pub const MAX_ITEM_ID: u64 = i64::MAX as u64;

/// Checks an item given by a user (their own files, `index add`): an id the index can store,
/// a title, a time that is a date. Refused here, the item is named by file and row, rather than
/// at indexing, after training. Returns the offending column and the reason.
pub fn validate_item(item: &Item) -> std::result::Result<(), (&'static str, String)> {
    if item.item_id > MAX_ITEM_ID {
        return Err((
            "item_id",
            format!(
                "{} is above {MAX_ITEM_ID}, the largest id an index can store",
                item.item_id
            ),
        ));
    }
    if item.title.trim().is_empty() {
        return Err(("title", "missing value".into()));
    }
    if let Some(ms) = item.created_at_ms {
        crate::records::check_time_ms(ms).map_err(|reason| ("created_at", reason))?;
    }
    Ok(())
}
