//! `embeddings.parquet`: item ids and their item-tower vectors, the hand-off from the indexer's
//! embedding step to index building (also across shards) and to the server.
//!
//! Unlike the row-typed tables in [`table`](crate::table), embeddings are held column-wise, as
//! one flat `f32` buffer, because that is the layout FAISS and libtorch take without copying
//! row by row.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, FixedSizeListArray, Float32Array, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Float32Type, UInt64Type};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};
use crate::fsutil::{hidden_sibling, sync_parent};
use crate::schema::{embeddings_schema, META_SCHEMA_VERSION, META_TABLE, SCHEMA_VERSION};
use crate::table::ROW_GROUP_ROWS;

/// Item vectors, row-aligned with their ids: `vectors[r*dim..(r+1)*dim]` belongs to `ids[r]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embeddings {
    pub dim: usize,
    pub ids: Vec<u64>,
    pub vectors: Vec<f32>,
}

impl Embeddings {
    pub fn new(dim: usize) -> Self {
        Embeddings {
            dim,
            ids: Vec::new(),
            vectors: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The vector of row `r`.
    pub fn vector(&self, r: usize) -> &[f32] {
        &self.vectors[r * self.dim..(r + 1) * self.dim]
    }

    /// Appends one row.
    pub fn push(&mut self, id: u64, vector: &[f32]) {
        debug_assert_eq!(vector.len(), self.dim);
        self.ids.push(id);
        self.vectors.extend_from_slice(vector);
    }

    /// Appends every row of `other` (same `dim`).
    pub fn extend(&mut self, other: &Embeddings) {
        debug_assert_eq!(other.dim, self.dim);
        self.ids.extend_from_slice(&other.ids);
        self.vectors.extend_from_slice(&other.vectors);
    }

    /// Row of each id. The first duplicate id found is an error, since an index must hold each
    /// item once.
    pub fn row_of(&self) -> std::result::Result<HashMap<u64, u32>, u64> {
        let mut rows = HashMap::with_capacity(self.ids.len());
        for (r, &id) in self.ids.iter().enumerate() {
            if rows.insert(id, r as u32).is_some() {
                return Err(id);
            }
        }
        Ok(rows)
    }

    /// Writes `path` atomically (temporary file, fsync, rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = hidden_sibling(path, "tmp");
        let parquet_err = |source| Error::Parquet {
            file: path.to_path_buf(),
            source,
        };
        let schema = embeddings_schema(self.dim as i32);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_dictionary_enabled(false)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let mut writer =
            ArrowWriter::try_new(file, Arc::clone(&schema), Some(props)).map_err(parquet_err)?;
        for start in (0..self.len()).step_by(ROW_GROUP_ROWS) {
            let end = (start + ROW_GROUP_ROWS).min(self.len());
            let ids = UInt64Array::from(self.ids[start..end].to_vec());
            let values =
                Float32Array::from(self.vectors[start * self.dim..end * self.dim].to_vec());
            let field = Arc::new(arrow::datatypes::Field::new(
                "item",
                DataType::Float32,
                false,
            ));
            let list = FixedSizeListArray::try_new(field, self.dim as i32, Arc::new(values), None)
                .map_err(|source| Error::Arrow {
                    file: path.to_path_buf(),
                    source,
                })?;
            let batch =
                RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(ids), Arc::new(list)])
                    .map_err(|source| Error::Arrow {
                        file: path.to_path_buf(),
                        source,
                    })?;
            writer.write(&batch).map_err(parquet_err)?;
        }
        let file = writer.into_inner().map_err(parquet_err)?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_parent(path)
    }

    /// Reads `path`, checking the table name, schema version, vector width and that every value
    /// is present and finite.
    pub fn read(path: &Path) -> Result<Embeddings> {
        let builder = crate::table::open_parquet(path)?;
        let meta = builder.schema().metadata();
        if meta.get(META_TABLE).map(String::as_str) != Some("embeddings") {
            return Err(Error::bad_file(
                path,
                "not an embeddings table (no `twotower.table = embeddings`)",
            ));
        }
        if meta.get(META_SCHEMA_VERSION).map(String::as_str) != Some(SCHEMA_VERSION) {
            return Err(Error::bad_file(
                path,
                format!("schema version is not {SCHEMA_VERSION}"),
            ));
        }
        let dim = match builder
            .schema()
            .field_with_name("embedding")
            .map(|f| f.data_type().clone())
        {
            Ok(DataType::FixedSizeList(_, d)) if d > 0 => d as usize,
            _ => {
                return Err(Error::bad_column(
                    path,
                    "embedding",
                    "expected FixedSizeList<Float32, dim>",
                ))
            }
        };
        let reader = builder
            .with_batch_size(8192)
            .build()
            .map_err(|source| Error::Parquet {
                file: path.to_path_buf(),
                source,
            })?;
        let mut out = Embeddings::new(dim);
        for batch in reader {
            let batch = batch.map_err(|source| Error::Arrow {
                file: path.to_path_buf(),
                source,
            })?;
            let first_row = out.len() + 1;
            let ids = batch
                .column_by_name("item_id")
                .and_then(|c| c.as_primitive_opt::<UInt64Type>())
                .ok_or_else(|| Error::bad_column(path, "item_id", "expected UInt64"))?;
            let list = batch
                .column_by_name("embedding")
                .and_then(|c| c.as_fixed_size_list_opt())
                .ok_or_else(|| Error::bad_column(path, "embedding", "expected FixedSizeList"))?;
            if let Some(i) = (0..ids.len()).find(|&i| ids.is_null(i)) {
                return Err(Error::bad_value(path, first_row + i, "item_id", "null"));
            }
            if let Some(i) = (0..list.len()).find(|&i| list.is_null(i)) {
                return Err(Error::bad_value(path, first_row + i, "embedding", "null"));
            }
            let values = list
                .values()
                .as_primitive_opt::<Float32Type>()
                .ok_or_else(|| Error::bad_column(path, "embedding", "values must be Float32"))?;
            let offset = list.offset() * dim;
            let values = &values.values()[offset..offset + list.len() * dim];
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::bad_value(
                    path,
                    first_row + i / dim,
                    "embedding",
                    "not finite",
                ));
            }
            out.ids.extend_from_slice(ids.values());
            out.vectors.extend_from_slice(values);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_duplicate_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("embeddings.parquet");
        let mut e = Embeddings::new(3);
        for i in 0..70_000u64 {
            e.push(i * 7, &[i as f32, -1.0, 0.5]);
        }
        e.write(&path).unwrap();
        let back = Embeddings::read(&path).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.row_of().unwrap()[&(69_999 * 7)], 69_999);
        e.push(7, &[0.0, 0.0, 0.0]);
        assert_eq!(e.row_of().unwrap_err(), 7);
    }

    #[test]
    fn refuses_other_tables_and_non_finite_values() {
        let dir = tempfile::tempdir().unwrap();
        let items = dir.path().join("items.parquet");
        crate::write_table::<crate::Item>(&items, &[]).unwrap();
        let err = Embeddings::read(&items).unwrap_err().to_string();
        assert!(err.contains("not an embeddings table"), "{err}");
        let path = dir.path().join("e.parquet");
        let mut e = Embeddings::new(2);
        e.push(1, &[0.0, 1.0]);
        e.push(2, &[f32::NAN, 1.0]);
        e.write(&path).unwrap();
        let err = Embeddings::read(&path).unwrap_err().to_string();
        assert!(err.contains("row 2") && err.contains("embedding"), "{err}");
    }
}
