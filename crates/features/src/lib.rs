//! # features: the data contract every stage shares
//!
//! The Arrow/Parquet schemas and records of items, users, events and training examples, the
//! data directory's layout (`DataLayout`, `DatasetInfo`), the tokenizer and vocabularies, the
//! history window and splits, and pretrained embeddings. No other crate knows a file format;
//! `ingest` writes a data directory through this crate and every later stage reads it.
//!
//! Data flow: raw files → ingest → **features** (`DATA_DIR`) → towers → trainer / indexer →
//! server.

pub mod embeddings;
pub mod error;
pub mod fsutil;
pub mod layout;
pub mod progress;
pub mod records;
pub mod schema;
pub mod splits;
pub mod table;
pub mod tokenizer;

pub use embeddings::Embeddings;
pub use error::{Error, Result};
pub use layout::{DataLayout, DatasetInfo, PrepareConfig};
pub use progress::{NoProgress, Progress};
pub use records::{Event, EventType, Example, HistoryEvent, Item, User};
pub use table::{read_table, write_table, Table, TableReader, TableWriter};
pub use tokenizer::{ItemTokens, Vocab, Vocabularies};

#[cfg(test)]
mod tests {
    //! Smoke test: proves the real Arrow and Parquet crates are linked and round-trip a schema.
    use std::sync::Arc;

    use arrow::array::{ArrayRef, ListBuilder, RecordBatch, StringBuilder, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ArrowWriter;

    #[test]
    fn parquet_round_trip_keeps_schema_and_values() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("item_id", DataType::UInt64, false),
            Field::new("title", DataType::Utf8, false),
            Field::new(
                "categories",
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                false,
            ),
        ]));
        let mut cats = ListBuilder::new(StringBuilder::new());
        cats.values().append_value("books");
        cats.values().append_value("fiction");
        cats.append(true);
        cats.values().append_value("music");
        cats.append(true);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(vec![7, 42])),
            Arc::new(arrow::array::StringArray::from(vec!["a tale", "a song"])),
            Arc::new(cats.finish()),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.parquet");
        let mut writer =
            ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema.clone(), None)
                .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();

        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>().unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].schema().fields(), schema.fields());
        assert_eq!(batches[0], batch);
    }
}
