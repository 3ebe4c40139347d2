//! The examples tables (`splits/*.parquet`): [`Example`] rows with their nested histories.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, ListArray, RecordBatch, StringBuilder, StructArray, UInt64Array,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Int64Type, SchemaRef, UInt64Type, UInt8Type};

use super::columns::*;
use super::Table;
use crate::error::{Error, Result};
use crate::records::{EventType, Example, HistoryEvent};
use crate::schema;

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
// Lenient reading of events (used by `ingest::sources::files` with `--on-bad-rows skip`)
