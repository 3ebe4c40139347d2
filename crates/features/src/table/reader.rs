//! Reading a table: streamed row group by row group, every row validated.

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::Table;
use crate::error::{Error, Result};
use crate::schema::{META_SCHEMA_VERSION, META_TABLE, SCHEMA_VERSION};

/// Reads a whole table, validating every row.
pub fn read_table<T: Table>(path: &Path) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    for batch in TableReader::<T>::open(path)? {
        rows.extend(batch?);
    }
    Ok(rows)
}

/// Streams a table batch by batch (one batch per row group or less), validating every row.
pub struct TableReader<T: Table> {
    pub(super) inner: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    path: PathBuf,
    next_row: usize,
    total_rows: usize,
    _table: std::marker::PhantomData<T>,
}

impl<T: Table> TableReader<T> {
    /// Opens `path`, checking that it is Parquet, not empty of columns, and of this table.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_row_groups(path, None)
    }

    /// Opens only the given row groups (for sharded jobs); `None` reads all.
    pub fn open_row_groups(path: &Path, row_groups: Option<Vec<usize>>) -> Result<Self> {
        let builder = open_parquet(path)?;
        let meta = builder.schema().metadata();
        if let Some(version) = meta.get(META_SCHEMA_VERSION) {
            if version != SCHEMA_VERSION {
                return Err(Error::bad_file(
                    path,
                    format!("schema version {version}, this build reads version {SCHEMA_VERSION}; re-run `twotower prepare`"),
                ));
            }
        }
        if let Some(table) = meta.get(META_TABLE) {
            if table != T::NAME {
                return Err(Error::bad_file(
                    path,
                    format!("holds table `{table}`, expected `{}`", T::NAME),
                ));
            }
        }
        let total_rows = builder.metadata().file_metadata().num_rows() as usize;
        let builder = match row_groups {
            Some(groups) => builder.with_row_groups(groups),
            None => builder,
        };
        let inner = builder
            .with_batch_size(8192)
            .build()
            .map_err(|source| Error::Parquet {
                file: path.to_path_buf(),
                source,
            })?;
        Ok(TableReader {
            inner,
            path: path.to_path_buf(),
            next_row: 1,
            total_rows,
            _table: Default::default(),
        })
    }

    /// Rows in the whole file (not only the selected row groups).
    pub fn total_rows(&self) -> usize {
        self.total_rows
    }
}

/// Number of row groups in a Parquet file.
pub fn row_group_count(path: &Path) -> Result<usize> {
    Ok(open_parquet(path)?.metadata().num_row_groups())
}

/// Opens a Parquet file for reading, naming the file in any error.
pub(crate) fn open_parquet(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|source| Error::Parquet {
        file: path.to_path_buf(),
        source,
    })
}

impl<T: Table> Iterator for TableReader<T> {
    type Item = Result<Vec<T>>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = match self.inner.next()? {
            Ok(batch) => batch,
            Err(source) => {
                return Some(Err(Error::Arrow {
                    file: self.path.clone(),
                    source,
                }))
            }
        };
        let first = self.next_row;
        self.next_row += batch.num_rows();
        Some(T::from_batch(&batch, &self.path, first))
    }
}
