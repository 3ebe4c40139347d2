//! The users table: conversion and validation of [`User`] rows.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{RecordBatch, UInt64Array};
use arrow::datatypes::SchemaRef;

use super::columns::*;
use super::Table;
use crate::error::Result;
use crate::records::User;
use crate::schema;

impl Table for User {
    const NAME: &'static str = "users";

    fn schema() -> SchemaRef {
        schema::users_schema()
    }

    fn to_batch(rows: &[Self]) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
        RecordBatch::try_new(
            Self::schema(),
            vec![
                Arc::new(UInt64Array::from_iter_values(
                    rows.iter().map(|r| r.user_id),
                )),
                Arc::new(string_list_array(rows.iter().map(|r| &r.features))),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch, file: &Path, first_row: usize) -> Result<Vec<Self>> {
        let c = Columns::new(batch, file, first_row);
        let ids = c.u64s("user_id")?;
        let features = c.string_lists("features", false)?;
        Ok(ids
            .into_iter()
            .zip(features)
            .map(|(user_id, features)| User { user_id, features })
            .collect())
    }
}
