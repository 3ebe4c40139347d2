//! Parquet files of [`records`](crate::records), with validation that names file, row and column.
//!
//! Reading is lenient about physical types where the meaning is unambiguous (an `Int64` id, a
//! `LargeUtf8` title, a timestamp in seconds) and strict about meaning (a null id, an unknown
//! event type, a negative timestamp). Writing is atomic: a file appears under its final name
//! only once it is complete and fsynced.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use arrow::array::{
    Array, ArrayRef, AsArray, GenericListArray, ListArray, ListBuilder, RecordBatch, StringArray,
    StringBuilder, StructArray, TimestampMillisecondArray, UInt64Array,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{
    DataType, Float32Type, Int64Type, SchemaRef, TimestampMillisecondType, UInt64Type, UInt8Type,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::error::{Error, Result};
use crate::fsutil::hidden_sibling;
use crate::records::{Event, EventType, Example, HistoryEvent, Item, User};
use crate::schema::{self, META_SCHEMA_VERSION, META_TABLE, SCHEMA_VERSION};

/// Rows per Parquet row group: the unit of streaming for the indexer and the trainer.
pub const ROW_GROUP_ROWS: usize = 65_536;

/// A table whose rows convert to and from Arrow record batches.
pub trait Table: Sized {
    /// Table name, stored in the file metadata.
    const NAME: &'static str;
    /// The one schema of this table.
    fn schema() -> SchemaRef;
    /// Encodes rows; an error here is a bug in twotower, not in the data.
    fn to_batch(rows: &[Self]) -> std::result::Result<RecordBatch, arrow::error::ArrowError>;
    /// Decodes and validates rows. `first_row` is the 1-based file row of the batch's first row.
    fn from_batch(batch: &RecordBatch, file: &Path, first_row: usize) -> Result<Vec<Self>>;
}

// ------------------------------------------------------------------------------------------------
// Writing

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
        crate::fsutil::sync_parent(&self.path)?;
        Ok(self.rows)
    }
}

impl<T: Table> Drop for TableWriter<T> {
    fn drop(&mut self) {
        if self.encoder.is_some() {
            // Not finished: stop the encoder and never leave a half-written file behind.
            let _ = self.join_encoder();
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

// ------------------------------------------------------------------------------------------------
// Reading

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
    inner: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
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

/// Looks up columns of one batch, coercing them to the expected type and naming file, row and
/// column in every error.
pub(crate) struct Columns<'a> {
    batch: &'a RecordBatch,
    file: &'a Path,
    first_row: usize,
}

impl<'a> Columns<'a> {
    pub(crate) fn new(batch: &'a RecordBatch, file: &'a Path, first_row: usize) -> Self {
        Columns {
            batch,
            file,
            first_row,
        }
    }

    /// 1-based file row of batch row `i`.
    pub(crate) fn row(&self, i: usize) -> usize {
        self.first_row + i
    }

    pub(crate) fn len(&self) -> usize {
        self.batch.num_rows()
    }

    /// The column cast to `ty`; `None` when absent and optional.
    pub(crate) fn get(
        &self,
        name: &str,
        ty: &DataType,
        required: bool,
    ) -> Result<Option<ArrayRef>> {
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

    pub(crate) fn required(&self, name: &str, ty: &DataType) -> Result<ArrayRef> {
        Ok(self.get(name, ty, true)?.expect("required column"))
    }

    /// Fails on the first null in `col`.
    pub(crate) fn no_nulls(&self, name: &str, col: &dyn Array) -> Result<()> {
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

    pub(crate) fn u64s(&self, name: &str) -> Result<Vec<u64>> {
        let col = self.required(name, &DataType::UInt64)?;
        self.no_nulls(name, &col)?;
        Ok(col.as_primitive::<UInt64Type>().values().to_vec())
    }

    pub(crate) fn opt_u64s(&self, name: &str) -> Result<Vec<Option<u64>>> {
        Ok(match self.get(name, &DataType::UInt64, false)? {
            Some(col) => col.as_primitive::<UInt64Type>().iter().collect(),
            None => vec![None; self.len()],
        })
    }

    pub(crate) fn timestamps(&self, name: &str, required: bool) -> Result<Vec<Option<i64>>> {
        let Some(col) = self.get(name, &schema::timestamp_ms(), required)? else {
            return Ok(vec![None; self.len()]);
        };
        if required {
            self.no_nulls(name, &col)?;
        }
        let ts = col.as_primitive::<TimestampMillisecondType>();
        if let Some(i) = (0..ts.len()).find(|&i| ts.is_valid(i) && ts.value(i) < 0) {
            return Err(Error::bad_value(
                self.file,
                self.row(i),
                name,
                format!("negative timestamp {}", ts.value(i)),
            ));
        }
        Ok(ts.iter().collect())
    }

    pub(crate) fn strings(&self, name: &str) -> Result<StringArray> {
        let col = self.required(name, &DataType::Utf8)?;
        self.no_nulls(name, &col)?;
        Ok(col.as_string::<i32>().clone())
    }

    pub(crate) fn opt_strings(&self, name: &str) -> Result<Option<StringArray>> {
        Ok(self
            .get(name, &DataType::Utf8, false)?
            .map(|c| c.as_string::<i32>().clone()))
    }

    pub(crate) fn opt_f32s(&self, name: &str) -> Result<Vec<Option<f32>>> {
        Ok(match self.get(name, &DataType::Float32, false)? {
            Some(col) => col.as_primitive::<Float32Type>().iter().collect(),
            None => vec![None; self.len()],
        })
    }

    /// A `List<Utf8>` column as one `Vec<String>` per row; absent or null lists are empty.
    pub(crate) fn string_lists(&self, name: &str, required: bool) -> Result<Vec<Vec<String>>> {
        let Some(col) = self.get(name, &schema::utf8_list(), required)? else {
            return Ok(vec![Vec::new(); self.len()]);
        };
        Ok(string_lists(col.as_list::<i32>()))
    }
}

fn string_lists(list: &GenericListArray<i32>) -> Vec<Vec<String>> {
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

fn string_list_array<'a>(rows: impl Iterator<Item = &'a Vec<String>>) -> ListArray {
    let mut builder = ListBuilder::new(StringBuilder::new());
    for row in rows {
        for v in row {
            builder.values().append_value(v);
        }
        builder.append(true);
    }
    builder.finish()
}

fn timestamps(values: impl Iterator<Item = Option<i64>>) -> TimestampMillisecondArray {
    TimestampMillisecondArray::from_iter(values).with_timezone("UTC")
}

// ------------------------------------------------------------------------------------------------
// The four tables

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
    if e.ts_ms < 0 {
        return Err(("ts", format!("negative timestamp {}", e.ts_ms)));
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

impl Table for Example {
    const NAME: &'static str = "examples";

    fn schema() -> SchemaRef {
        schema::examples_schema()
    }

    fn to_batch(rows: &[Self]) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
        let history = history_array(rows)?;
        RecordBatch::try_new(
            Self::schema(),
            vec![
                Arc::new(UInt64Array::from_iter_values(
                    rows.iter().map(|r| r.user_id),
                )),
                Arc::new(timestamps(rows.iter().map(|r| Some(r.ts_ms)))),
                Arc::new(UInt64Array::from_iter_values(
                    rows.iter().map(|r| r.target_item_id),
                )),
                Arc::new(history),
                Arc::new(arrow::array::UInt8Array::from_iter_values(
                    rows.iter().map(|r| r.hour),
                )),
                Arc::new(arrow::array::UInt8Array::from_iter_values(
                    rows.iter().map(|r| r.weekday),
                )),
                Arc::new(string_list_array(rows.iter().map(|r| &r.user_features))),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch, file: &Path, first_row: usize) -> Result<Vec<Self>> {
        let c = Columns::new(batch, file, first_row);
        let users = c.u64s("user_id")?;
        let ts = c.timestamps("ts", true)?;
        let targets = c.u64s("target_item_id")?;
        let hours = c.required("hour", &DataType::UInt8)?;
        let weekdays = c.required("weekday", &DataType::UInt8)?;
        let features = c.string_lists("user_features", false)?;
        let history_col = c.required("history", &schema::history_type())?;
        let histories = read_histories(history_col.as_list::<i32>(), &c)?;
        let hours = hours.as_primitive::<UInt8Type>();
        let weekdays = weekdays.as_primitive::<UInt8Type>();
        Ok(histories
            .into_iter()
            .zip(features)
            .enumerate()
            .map(|(i, (history, user_features))| Example {
                user_id: users[i],
                ts_ms: ts[i].expect("checked"),
                target_item_id: targets[i],
                history,
                hour: hours.value(i),
                weekday: weekdays.value(i),
                user_features,
            })
            .collect())
    }
}

fn history_array(rows: &[Example]) -> std::result::Result<ListArray, arrow::error::ArrowError> {
    let total: usize = rows.iter().map(|r| r.history.len()).sum();
    let mut types = StringBuilder::with_capacity(total, total * 6);
    let mut items = Vec::with_capacity(total);
    let mut queries = StringBuilder::with_capacity(total, 0);
    let mut gaps = Vec::with_capacity(total);
    for e in rows.iter().flat_map(|r| &r.history) {
        types.append_value(e.event_type.as_str());
        items.push(e.item_id);
        queries.append_option(e.query.as_deref());
        gaps.push(e.gap_s);
    }
    let values = StructArray::try_new(
        schema::history_event_fields(),
        vec![
            Arc::new(types.finish()),
            Arc::new(UInt64Array::from(items)),
            Arc::new(queries.finish()),
            Arc::new(arrow::array::Int64Array::from(gaps)),
        ],
        None,
    )?;
    let offsets = OffsetBuffer::from_lengths(rows.iter().map(|r| r.history.len()));
    let DataType::List(field) = schema::history_type() else {
        unreachable!()
    };
    ListArray::try_new(field, offsets, Arc::new(values), None::<NullBuffer>)
}

fn read_histories(list: &ListArray, c: &Columns<'_>) -> Result<Vec<Vec<HistoryEvent>>> {
    let values = list.values().as_struct();
    let col = |name: &str| values.column_by_name(name).expect("cast to history type");
    let types = col("event_type").as_string::<i32>().clone();
    let items = col("item_id").as_primitive::<UInt64Type>().clone();
    let queries = col("query").as_string::<i32>().clone();
    let gaps = col("gap_s").as_primitive::<Int64Type>().clone();
    let offsets = list.value_offsets();
    let mut out = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        let mut history = Vec::with_capacity((offsets[i + 1] - offsets[i]) as usize);
        for j in offsets[i] as usize..offsets[i + 1] as usize {
            let name = if types.is_valid(j) {
                types.value(j)
            } else {
                ""
            };
            let event_type = EventType::parse(name).ok_or_else(|| {
                Error::bad_value(
                    c.file,
                    c.row(i),
                    "history.event_type",
                    format!("unknown event type `{name}`"),
                )
            })?;
            if gaps.is_null(j) || gaps.value(j) < 0 {
                return Err(Error::bad_value(
                    c.file,
                    c.row(i),
                    "history.gap_s",
                    "history event is not before the target",
                ));
            }
            history.push(HistoryEvent {
                event_type,
                item_id: items.is_valid(j).then(|| items.value(j)),
                query: queries.is_valid(j).then(|| queries.value(j).to_string()),
                gap_s: gaps.value(j),
            });
        }
        out.push(history);
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------------
// Lenient reading of events (used by `sources::files` with `--on-bad-rows skip`)

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

#[cfg(test)]
mod tests {
    use super::*;

    fn example(user_id: u64) -> Example {
        Example {
            user_id,
            ts_ms: 1_000_000,
            target_item_id: 9,
            history: vec![
                HistoryEvent {
                    event_type: EventType::Search,
                    item_id: None,
                    query: Some("red shoes".into()),
                    gap_s: 60,
                },
                HistoryEvent {
                    event_type: EventType::View,
                    item_id: Some(3),
                    query: None,
                    gap_s: 5,
                },
            ],
            hour: 13,
            weekday: 2,
            user_features: vec!["age:25-34".into()],
        }
    }

    #[test]
    fn every_table_round_trips_through_parquet() {
        let dir = tempfile::tempdir().unwrap();
        let items = vec![
            Item {
                item_id: 1,
                title: "Red shoe".into(),
                aspects: vec!["color:red".into()],
                categories: vec!["shoes".into()],
                created_at_ms: Some(5),
            },
            Item {
                item_id: 2,
                title: "Hat".into(),
                aspects: vec![],
                categories: vec![],
                created_at_ms: None,
            },
        ];
        let users = vec![User {
            user_id: 4,
            features: vec!["gender:f".into()],
        }];
        let events = vec![
            Event {
                user_id: 4,
                ts_ms: 10,
                event_type: EventType::Search,
                item_id: None,
                query: Some("shoe".into()),
                value: None,
            },
            Event {
                user_id: 4,
                ts_ms: 11,
                event_type: EventType::Rate,
                item_id: Some(1),
                query: None,
                value: Some(4.5),
            },
        ];
        let examples = vec![
            example(4),
            Example {
                history: vec![],
                ..example(5)
            },
        ];
        let p = |n: &str| dir.path().join(n);
        write_table(&p("items.parquet"), &items).unwrap();
        write_table(&p("users.parquet"), &users).unwrap();
        write_table(&p("events.parquet"), &events).unwrap();
        write_table(&p("examples.parquet"), &examples).unwrap();
        assert_eq!(read_table::<Item>(&p("items.parquet")).unwrap(), items);
        assert_eq!(read_table::<User>(&p("users.parquet")).unwrap(), users);
        assert_eq!(read_table::<Event>(&p("events.parquet")).unwrap(), events);
        assert_eq!(
            read_table::<Example>(&p("examples.parquet")).unwrap(),
            examples
        );
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
    }

    #[test]
    fn reading_the_wrong_table_names_both_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.parquet");
        write_table(
            &path,
            &[User {
                user_id: 1,
                features: vec![],
            }],
        )
        .unwrap();
        let err = read_table::<Item>(&path).unwrap_err().to_string();
        assert!(
            err.contains("users.parquet") && err.contains("`users`") && err.contains("`items`"),
            "{err}"
        );
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.parquet");
        {
            let mut w = TableWriter::<User>::create(&path).unwrap();
            w.write(&[User {
                user_id: 1,
                features: vec![],
            }])
            .unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn event_without_item_or_query_is_rejected() {
        let e = Event {
            user_id: 1,
            ts_ms: 1,
            event_type: EventType::View,
            item_id: None,
            query: None,
            value: None,
        };
        assert_eq!(validate_event(&e).unwrap_err().0, "item_id");
        let s = Event {
            event_type: EventType::Search,
            ..e
        };
        assert_eq!(validate_event(&s).unwrap_err().0, "query");
    }
}
