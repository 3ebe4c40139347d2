//! Start-up state from the prepared data: every user's history and features, and item
//! popularity (interaction counts, the fallback order).

use std::collections::HashMap;
use std::path::Path;

use features::layout::DataLayout;
use features::{Event, TableReader, User};

use crate::error::Result;
use crate::history::{HistoryStore, StoredEvent};

/// Interaction counts per item id.
pub type Counts = HashMap<u64, u64>;

/// Adds one event to the store and the counts.
pub fn apply(store: &HistoryStore, counts: &mut Counts, e: &Event) {
    if let Some(id) = e.item_id {
        *counts.entry(id).or_default() += 1;
    }
    store.record(e.user_id, StoredEvent::from_event(e));
}

/// Streams `events.parquet` and `users.parquet` of `DATA_DIR` into the store.
pub fn seed(store: &HistoryStore, data_dir: &Path) -> Result<Counts> {
    let layout = DataLayout(data_dir.to_path_buf());
    let mut counts = Counts::new();
    for batch in TableReader::<Event>::open(&layout.events())? {
        for e in batch? {
            apply(store, &mut counts, &e);
        }
    }
    if layout.users().is_file() {
        for batch in TableReader::<User>::open(&layout.users())? {
            for u in batch? {
                if !u.features.is_empty() {
                    store.set_features(u.user_id, u.features);
                }
            }
        }
    }
    Ok(counts)
}
