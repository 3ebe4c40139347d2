//! Start-up state from the prepared data: every user's history and features, and item
//! popularity (interaction counts, the fallback order).

use std::collections::HashMap;
use std::path::Path;

use features::layout::DataLayout;
use features::{Event, TableReader, User};

use crate::dedup::DedupWindow;
use crate::error::Result;
use crate::history::{HistoryStore, StoredEvent};
use crate::logrecord::Record;

/// Interaction counts per item id.
pub type Counts = HashMap<u64, u64>;

/// Adds one event to the store and the counts.
pub fn apply(store: &HistoryStore, counts: &mut Counts, e: &Event) {
    if let Some(id) = e.item_id {
        *counts.entry(id).or_default() += 1;
    }
    store.record(e.user_id, StoredEvent::from_event(e));
}

/// Applies one event-log record to the store, the counts and the idempotency window: what a
/// replay does at start-up, what compaction does to build the state it writes back, and what a
/// replica does with each event-bus message. `counts` is `None` once serving: item popularity
/// is fixed at start-up.
pub fn apply_record(
    store: &HistoryStore,
    mut counts: Option<&mut Counts>,
    dedup: &mut DedupWindow,
    record: Record,
) {
    match record {
        Record::Batch { events, key } => {
            if let Some(k) = key {
                let digest = crate::dedup::batch_digest(&events);
                dedup.insert(&k, events.len() as u64, Some(digest));
            }
            for e in &events {
                match counts.as_deref_mut() {
                    Some(counts) => apply(store, counts, e),
                    None => store.record(e.user_id, StoredEvent::from_event(e)),
                }
            }
        }
        Record::Seen { user_id, items } => store.add_seen(user_id, &items),
        Record::Counts(c) => {
            if let Some(counts) = counts {
                for (id, n) in c {
                    *counts.entry(id).or_default() += n;
                }
            }
        }
        Record::Keys(keys) => {
            for (k, n) in keys {
                dedup.insert(&k, n, None);
            }
        }
    }
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
