//! A dataset as loaded from its source, before validation and splitting.

use features::records::{Event, Item, User};

/// Items, users and events of one source, in no particular order.
#[derive(Debug, Default, Clone)]
pub struct RawData {
    pub items: Vec<Item>,
    pub users: Vec<User>,
    pub events: Vec<Event>,
    /// Bad event rows skipped while loading (only with `--on-bad-rows skip`).
    pub skipped_rows: u64,
}
