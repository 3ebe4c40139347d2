//! Exact request filters over catalog rows: item ids to drop (explicit, and the user's seen
//! items), categories an item must have one of, and categories it must have none of.

use std::collections::HashSet;
use std::sync::Arc;

use crate::catalog::ItemCatalog;
use crate::seen::SeenItems;

/// A resolved filter: category names already turned into this version's category ids.
#[derive(Debug, Clone, Default)]
pub struct RowFilter {
    /// Ids the request excludes (explicitly, and its inline events' items).
    pub exclude_ids: HashSet<u64>,
    /// The user's stored seen items, shared with the history store rather than copied.
    pub seen: Arc<SeenItems>,
    /// Sorted; empty means no restriction.
    pub include: Vec<u32>,
    /// Sorted.
    pub exclude: Vec<u32>,
}

impl RowFilter {
    /// Whether the item at `row` (id `id`) may be returned.
    pub fn passes(&self, id: u64, row: u32, catalog: &ItemCatalog) -> bool {
        if self.exclude_ids.contains(&id) || self.seen.contains(id) {
            return false;
        }
        if self.include.is_empty() && self.exclude.is_empty() {
            return true;
        }
        let cats = catalog.category_ids_of(row);
        let has = |set: &[u32]| cats.iter().any(|c| set.binary_search(c).is_ok());
        (self.include.is_empty() || has(&self.include)) && !has(&self.exclude)
    }

    /// At most how many ids the filter drops (what the search over-fetches for).
    pub fn excluded_ids(&self) -> usize {
        self.exclude_ids.len() + self.seen.len()
    }

    /// Whether every item passes (the search needs no over-fetch).
    pub fn is_empty(&self) -> bool {
        self.excluded_ids() == 0 && self.include.is_empty() && self.exclude.is_empty()
    }
}
