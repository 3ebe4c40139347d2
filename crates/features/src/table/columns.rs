//! Typed column access for decoding, with errors that name file, row and column, and the Arrow
//! array builders the tables share.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, GenericListArray, ListArray, ListBuilder, RecordBatch, StringArray,
    StringBuilder, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Float32Type, TimestampMillisecondType, UInt64Type};

use crate::error::{Error, Result};
use crate::schema;

/// Looks up columns of one batch, coercing them to the expected type and naming file, row and
/// column in every error.
pub struct Columns<'a> {
    batch: &'a RecordBatch,
    pub(super) file: &'a Path,
    first_row: usize,
}

impl<'a> Columns<'a> {
    pub fn new(batch: &'a RecordBatch, file: &'a Path, first_row: usize) -> Self {
        Columns {
            batch,
            file,
            first_row,
        }
    }

    /// 1-based file row of batch row `i`.
    pub fn row(&self, i: usize) -> usize {
        self.first_row + i
    }

    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.num_rows() == 0
    }

    /// The column cast to `ty`; `None` when absent and optional.
    pub fn get(&self, name: &str, ty: &DataType, required: bool) -> Result<Option<ArrayRef>> {
        let Some(col) = self.batch.column_by_name(name) else {
            return if required {
                Err(Error::bad_column(
                    self.file,
                    name,
                    format!("missing (expected {ty})"),
                ))
            } else {
                Ok(None)
            };
        };
        if col.data_type() == ty {
            return Ok(Some(col.clone()));
        }
        if let (DataType::Timestamp(..), DataType::Timestamp(unit, _)) = (col.data_type(), ty) {
            // Arrow timestamps count from the epoch in UTC whatever zone they are tagged with, so
            // change the unit in the column's own zone (no zone database needed) and re-tag.
            let DataType::Timestamp(_, zone) = col.data_type() else {
                unreachable!()
            };
            let cast = arrow::compute::cast(col, &DataType::Timestamp(*unit, zone.clone()))
                .map_err(|e| Error::bad_column(self.file, name, e.to_string()))?;
            let ms = cast
                .as_primitive::<TimestampMillisecondType>()
                .clone()
                .with_timezone("UTC");
            return Ok(Some(Arc::new(ms)));
        }
        let compatible = match (col.data_type(), ty) {
            (DataType::Int64 | DataType::Int32 | DataType::UInt32, DataType::Timestamp(..)) => true,
            (a, DataType::UInt64) => a.is_integer(),
            (a, DataType::UInt8) => a.is_integer(),
            (a, DataType::Int64) => a.is_integer(),
            (a, DataType::Float32) => a.is_numeric(),
            (
                DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(..),
                DataType::Utf8,
            ) => true,
            (DataType::List(_) | DataType::LargeList(_), DataType::List(_)) => true,
            _ => false,
        };
        let cast = compatible
            .then(|| arrow::compute::cast(col, ty).ok())
            .flatten();
        match cast {
            Some(c) => {
                // A safe cast turns values it cannot convert (e.g. a negative id) into nulls.
                if let Some(i) = (0..c.len()).find(|&i| c.is_null(i) && !col.is_null(i)) {
                    return Err(Error::bad_value(
                        self.file,
                        self.row(i),
                        name,
                        format!("value does not fit {ty}"),
                    ));
                }
                Ok(Some(c))
            }
            None => Err(Error::bad_column(
                self.file,
                name,
                format!("has type {}, expected {ty}", col.data_type()),
            )),
        }
    }

    pub fn required(&self, name: &str, ty: &DataType) -> Result<ArrayRef> {
        Ok(self.get(name, ty, true)?.expect("required column"))
    }

    /// Fails on the first null in `col`.
    pub fn no_nulls(&self, name: &str, col: &dyn Array) -> Result<()> {
        match (0..col.len()).find(|&i| col.is_null(i)) {
            Some(i) => Err(Error::bad_value(
                self.file,
                self.row(i),
                name,
                "missing value",
            )),
            None => Ok(()),
        }
    }

    pub fn u64s(&self, name: &str) -> Result<Vec<u64>> {
        let col = self.required(name, &DataType::UInt64)?;
        self.no_nulls(name, &col)?;
        Ok(col.as_primitive::<UInt64Type>().values().to_vec())
    }

    pub fn opt_u64s(&self, name: &str) -> Result<Vec<Option<u64>>> {
        Ok(match self.get(name, &DataType::UInt64, false)? {
            Some(col) => col.as_primitive::<UInt64Type>().iter().collect(),
            None => vec![None; self.len()],
        })
    }

    pub fn timestamps(&self, name: &str, required: bool) -> Result<Vec<Option<i64>>> {
        let Some(col) = self.get(name, &schema::timestamp_ms(), required)? else {
            return Ok(vec![None; self.len()]);
        };
        if required {
            self.no_nulls(name, &col)?;
        }
        let ts = col.as_primitive::<TimestampMillisecondType>();
        for i in (0..ts.len()).filter(|&i| ts.is_valid(i)) {
            crate::records::check_time_ms(ts.value(i))
                .map_err(|reason| Error::bad_value(self.file, self.row(i), name, reason))?;
        }
        Ok(ts.iter().collect())
    }

    pub fn strings(&self, name: &str) -> Result<StringArray> {
        let col = self.required(name, &DataType::Utf8)?;
        self.no_nulls(name, &col)?;
        Ok(col.as_string::<i32>().clone())
    }

    pub fn opt_strings(&self, name: &str) -> Result<Option<StringArray>> {
        Ok(self
            .get(name, &DataType::Utf8, false)?
            .map(|c| c.as_string::<i32>().clone()))
    }

    pub fn opt_f32s(&self, name: &str) -> Result<Vec<Option<f32>>> {
        Ok(match self.get(name, &DataType::Float32, false)? {
            Some(col) => col.as_primitive::<Float32Type>().iter().collect(),
            None => vec![None; self.len()],
        })
    }

    /// A `List<Utf8>` column as one `Vec<String>` per row; absent or null lists are empty.
    pub fn string_lists(&self, name: &str, required: bool) -> Result<Vec<Vec<String>>> {
        let Some(col) = self.get(name, &schema::utf8_list(), required)? else {
            return Ok(vec![Vec::new(); self.len()]);
        };
        Ok(string_lists(col.as_list::<i32>()))
    }
}

pub(super) fn string_lists(list: &GenericListArray<i32>) -> Vec<Vec<String>> {
    let values = list.values().as_string::<i32>();
    let offsets = list.value_offsets();
    (0..list.len())
        .map(|i| {
            if list.is_null(i) {
                return Vec::new();
            }
            (offsets[i] as usize..offsets[i + 1] as usize)
                .filter(|&j| values.is_valid(j))
                .map(|j| values.value(j).to_string())
                .collect()
        })
        .collect()
}

pub(super) fn string_list_array<'a>(rows: impl Iterator<Item = &'a Vec<String>>) -> ListArray {
    let mut builder = ListBuilder::new(StringBuilder::new());
    for row in rows {
        for v in row {
            builder.values().append_value(v);
        }
        builder.append(true);
    }
    builder.finish()
}

pub(super) fn timestamps(values: impl Iterator<Item = Option<i64>>) -> TimestampMillisecondArray {
    TimestampMillisecondArray::from_iter(values).with_timezone("UTC")
}
