//! The Arrow schemas of every table twotower reads or writes, defined once.
//!
//! Each Parquet file carries `twotower.schema_version` and `twotower.table` in its key-value
//! metadata, so a stage can refuse a file written by an incompatible version of the schema.
//! `docs/data.md` describes the same schemas for people.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

/// Version of the schemas below. Bump it on any incompatible change.
pub const SCHEMA_VERSION: &str = "1";
/// Parquet metadata key holding [`SCHEMA_VERSION`].
pub const META_SCHEMA_VERSION: &str = "twotower.schema_version";
/// Parquet metadata key holding the table name (`items`, `users`, `events`, `examples`).
pub const META_TABLE: &str = "twotower.table";

/// `List<Utf8>`, used for aspects, categories and user features.
pub fn utf8_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

/// Timestamps are milliseconds since the Unix epoch, in UTC.
pub fn timestamp_ms() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn with_meta(table: &str, fields: Vec<Field>) -> SchemaRef {
    let metadata = HashMap::from([
        (META_SCHEMA_VERSION.to_string(), SCHEMA_VERSION.to_string()),
        (META_TABLE.to_string(), table.to_string()),
    ]);
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// `items`: the catalog. Content only; `item_id` is never a model input.
pub fn items_schema() -> SchemaRef {
    with_meta(
        "items",
        vec![
            Field::new("item_id", DataType::UInt64, false),
            Field::new("title", DataType::Utf8, false),
            Field::new("aspects", utf8_list(), false),
            Field::new("categories", utf8_list(), false),
            Field::new("created_at", timestamp_ms(), true),
        ],
    )
}

/// `users`: profile features as `name:value` strings.
pub fn users_schema() -> SchemaRef {
    with_meta(
        "users",
        vec![
            Field::new("user_id", DataType::UInt64, false),
            Field::new("features", utf8_list(), false),
        ],
    )
}

/// `events`: everything users did, one row per event.
pub fn events_schema() -> SchemaRef {
    with_meta(
        "events",
        vec![
            Field::new("user_id", DataType::UInt64, false),
            Field::new("ts", timestamp_ms(), false),
            Field::new("event_type", DataType::Utf8, false),
            Field::new("item_id", DataType::UInt64, true),
            Field::new("query", DataType::Utf8, true),
            Field::new("value", DataType::Float32, true),
        ],
    )
}

/// Fields of one history event inside an example.
pub fn history_event_fields() -> Fields {
    Fields::from(vec![
        Field::new("event_type", DataType::Utf8, false),
        Field::new("item_id", DataType::UInt64, true),
        Field::new("query", DataType::Utf8, true),
        Field::new("gap_s", DataType::Int64, false),
    ])
}

/// `List<Struct<history event>>`.
pub fn history_type() -> DataType {
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(history_event_fields()),
        true,
    )))
}

/// `examples`: one training or evaluation row each (`splits/{train,valid,test}.parquet`).
pub fn examples_schema() -> SchemaRef {
    with_meta(
        "examples",
        vec![
            Field::new("user_id", DataType::UInt64, false),
            Field::new("ts", timestamp_ms(), false),
            Field::new("target_item_id", DataType::UInt64, false),
            Field::new("history", history_type(), false),
            Field::new("hour", DataType::UInt8, false),
            Field::new("weekday", DataType::UInt8, false),
            Field::new("user_features", utf8_list(), false),
        ],
    )
}

/// `embeddings`: the item tower's output for every catalog item (`INDEX_ROOT/<version>/`).
/// The vector width is the model's `dim`, fixed per file.
pub fn embeddings_schema(dim: i32) -> SchemaRef {
    with_meta(
        "embeddings",
        vec![
            Field::new("item_id", DataType::UInt64, false),
            Field::new(
                "embedding",
                DataType::FixedSizeList(
                    Arc::new(Field::new("item", DataType::Float32, false)),
                    dim,
                ),
                false,
            ),
        ],
    )
}
