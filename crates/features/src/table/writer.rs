//! Writing a table: rows to Arrow batches on the caller's thread, Parquet encoding on a thread
//! of the writer's own, and the file renamed into place only once complete.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::{Table, ROW_GROUP_ROWS};
use crate::error::{Error, Result};
use crate::fsutil::hidden_sibling;
use crate::schema::{META_SCHEMA_VERSION, META_TABLE, SCHEMA_VERSION};

/// Streams rows of one table into a Parquet file that appears atomically on [`finish`].
///
/// Rows become Arrow batches on the caller's thread; Parquet encoding, compression and writing
/// happen on a thread of the writer's own, so producing rows and encoding them overlap
/// (`prepare` on two cores, see docs/benchmarks.md). Converting on the caller's thread also keeps
/// allocation and deallocation of the rows on one thread, which glibc's allocator needs to be
/// fast.
///
/// [`finish`]: TableWriter::finish
pub struct TableWriter<T: Table> {
    sender: Option<SyncSender<RecordBatch>>,
    encoder: Option<JoinHandle<Result<File>>>,
    tmp: PathBuf,
    path: PathBuf,
    rows: u64,
    /// Rows given one at a time, encoded together once there are enough.
    pending: Vec<T>,
    /// The file is in place at `path`; until then a drop removes the temporary file.
    finished: bool,
}

/// Rows gathered by [`TableWriter::push`] before they are encoded as one Arrow batch: per-row
/// batches would cost more in encoding overhead than the rows themselves.
const PUSH_BATCH_ROWS: usize = 8192;

impl<T: Table> TableWriter<T> {
    /// Starts writing `path` (through a temporary file beside it).
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = hidden_sibling(path, "tmp");
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            // Dictionaries pay off for strings (event types, aspects, features); for ids, times
            // and gaps they only cost encoding time before Parquet falls back to plain.
            .set_dictionary_enabled(false)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_key_value_metadata(Some(vec![
                KeyValue::new(META_SCHEMA_VERSION.to_string(), SCHEMA_VERSION.to_string()),
                KeyValue::new(META_TABLE.to_string(), T::NAME.to_string()),
            ]));
        let props = string_columns(&T::schema())
            .into_iter()
            .fold(props, |p, path| p.set_column_dictionary_enabled(path, true))
            .build();
        let parquet_err = |source| Error::Parquet {
            file: path.to_path_buf(),
            source,
        };
        let mut writer =
            ArrowWriter::try_new(file, T::schema(), Some(props)).map_err(parquet_err)?;
        let (sender, batches) = sync_channel::<RecordBatch>(2);
        let file_name = path.to_path_buf();
        let encoder = std::thread::spawn(move || -> Result<File> {
            let err = |source| Error::Parquet {
                file: file_name.clone(),
                source,
            };
            for batch in batches {
                writer.write(&batch).map_err(err)?;
            }
            writer.into_inner().map_err(err)
        });
        Ok(TableWriter {
            sender: Some(sender),
            encoder: Some(encoder),
            tmp,
            path: path.to_path_buf(),
            rows: 0,
            pending: Vec::new(),
            finished: false,
        })
    }

    /// Appends rows.
    pub fn write(&mut self, rows: &[T]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let n = rows.len() as u64;
        let batch = T::to_batch(rows).map_err(|source| Error::Arrow {
            file: self.path.clone(),
            source,
        })?;
        let sender = self.sender.as_ref().expect("TableWriter used after finish");
        if sender.send(batch).is_err() {
            // The encoder stopped: it returned an error, which joining surfaces.
            return Err(self.join_encoder().err().unwrap_or_else(|| {
                Error::bad_file(
                    &self.path,
                    "Parquet encoder stopped unexpectedly (a bug in twotower)",
                )
            }));
        }
        self.rows += n;
        Ok(())
    }

    /// Appends one row (buffered; encoded in batches).
    pub fn push(&mut self, row: T) -> Result<()> {
        self.pending.push(row);
        if self.pending.len() >= PUSH_BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.write(&pending)?;
        self.pending = pending;
        self.pending.clear();
        Ok(())
    }

    /// Rows written so far (including buffered ones).
    pub fn rows(&self) -> u64 {
        self.rows + self.pending.len() as u64
    }

    fn join_encoder(&mut self) -> Result<File> {
        self.sender = None;
        let encoder = self.encoder.take().expect("encoder joined twice");
        match encoder.join() {
            Ok(result) => result,
            Err(_) => Err(Error::bad_file(
                &self.path,
                "Parquet encoder panicked (a bug in twotower)",
            )),
        }
    }

    /// Closes, fsyncs and renames the file into place. Returns the number of rows.
    pub fn finish(mut self) -> Result<u64> {
        self.flush()?;
        let file = self.join_encoder()?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.finished = true;
        crate::fsutil::sync_parent(&self.path)?;
        Ok(self.rows)
    }
}

impl<T: Table> Drop for TableWriter<T> {
    fn drop(&mut self) {
        // Not finished (an error, or a write that failed while closing: a full disk): stop the
        // encoder and never leave a half-written file behind.
        if self.encoder.is_some() {
            let _ = self.join_encoder();
        }
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes all `rows` to `path` atomically.
pub fn write_table<T: Table>(path: &Path, rows: &[T]) -> Result<u64> {
    let mut writer = TableWriter::<T>::create(path)?;
    for chunk in rows.chunks(ROW_GROUP_ROWS) {
        writer.write(chunk)?;
    }
    writer.finish()
}

/// Parquet paths of the string leaf columns of a schema, as arrow-rs lays out lists
/// (`name.list.item`) and structs (`name.field`).
fn string_columns(schema: &arrow::datatypes::Schema) -> Vec<ColumnPath> {
    fn walk(field: &arrow::datatypes::Field, prefix: Vec<String>, out: &mut Vec<ColumnPath>) {
        let mut path = prefix;
        path.push(field.name().clone());
        match field.data_type() {
            DataType::Utf8 => out.push(ColumnPath::new(path)),
            DataType::List(item) => {
                path.push("list".into());
                walk(item, path, out);
            }
            DataType::Struct(fields) => fields.iter().for_each(|f| walk(f, path.clone(), out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    schema
        .fields()
        .iter()
        .for_each(|f| walk(f, Vec::new(), &mut out));
    out
}
