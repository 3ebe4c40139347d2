//! Parquet files of [`records`](crate::records), with validation that names file, row and column.
//!
//! Reading is lenient about physical types where the meaning is unambiguous (an `Int64` id, a
//! `LargeUtf8` title, a timestamp in seconds) and strict about meaning (a null id, an unknown
//! event type, a negative timestamp). Writing is atomic: a file appears under its final name
//! only once it is complete and fsynced.

use std::path::Path;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::error::Result;

mod columns;
mod event;
mod example;
mod item;
mod reader;
mod user;
mod writer;

pub use columns::Columns;
pub use event::{read_events_lenient, validate_event};
pub use item::{validate_item, MAX_ITEM_ID};
pub(crate) use reader::open_parquet;
pub use reader::{read_table, row_group_count, TableReader};
pub use writer::{write_table, TableWriter};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Event, EventType, Example, HistoryEvent, Item, User};

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
