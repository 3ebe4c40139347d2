//! Every user's recent events and the items they have interacted with, in memory.
//!
//! Seeded from `DATA_DIR/events.parquet` and `users.parquet`, then from the event log, then kept
//! current by `RecordEvents`. Two structures per user, because they answer different questions:
//! - `recent`: the last `bound` events in the canonical order of `features::splits` (the
//!   model's history length L): what the user tower reads;
//! - `seen`: every item id ever interacted with: what `exclude_seen` removes. It is unbounded
//!   ([`SeenItems`], about 8 bytes an item), because a filter that forgets is not exact.
//!   Requests share it through an `Arc` instead of copying it; an insert copies it only while a
//!   request still holds the previous one, so neither side degrades as a user's history grows.
//!
//! Users are spread over shards, each behind its own `RwLock`, so writers (the event log's
//! commit thread) and readers (requests) rarely meet.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use features::splits::{HistoryProtocol, TieOrder, Timed};
use features::{Event, EventType};

use crate::seen::SeenItems;

const SHARDS: usize = 64;

/// One event as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredEvent {
    pub ts_ms: i64,
    pub event_type: EventType,
    pub item_id: Option<u64>,
    pub query: Option<Arc<str>>,
}

impl StoredEvent {
    pub fn from_event(e: &Event) -> StoredEvent {
        StoredEvent {
            ts_ms: e.ts_ms,
            event_type: e.event_type,
            item_id: e.item_id,
            query: e.query.as_deref().map(Arc::from),
        }
    }
}

/// Serving orders histories exactly like training did: `features::splits::TieOrder`.
impl Timed for StoredEvent {
    fn ts_ms(&self) -> i64 {
        self.ts_ms
    }
    fn tie_key(&self) -> (bool, Option<u64>, EventType, Option<&str>) {
        (
            self.item_id.is_some(),
            self.item_id,
            self.event_type,
            self.query.as_deref(),
        )
    }
}

/// Sorts events in the canonical order of training (stable: ties under
/// [`TieOrder::Source`] keep the order they came in).
pub fn sort_canonical(events: &mut [StoredEvent], ties: TieOrder) {
    events.sort_by(|a, b| ties.compare(a, b));
}

#[derive(Default)]
struct UserState {
    recent: VecDeque<StoredEvent>,
    seen: Arc<SeenItems>,
    features: Arc<[String]>,
}

/// What a request needs to know about one user.
#[derive(Debug, Clone, Default)]
pub struct UserView {
    /// Stored events strictly before the request time, oldest first (at most `bound`).
    pub events: Vec<StoredEvent>,
    /// Every item the user interacted with.
    pub seen: Arc<SeenItems>,
    /// Profile features from `users.parquet`.
    pub features: Arc<[String]>,
}

/// The in-memory history store.
pub struct HistoryStore {
    bound: usize,
    ties: TieOrder,
    protocol: HistoryProtocol,
    shards: Vec<RwLock<HashMap<u64, UserState>>>,
    users: AtomicUsize,
    /// Seen items over all users: the one part of the store that grows with every new
    /// (user, item) pair, so operators can tell it from a leak (`twotower_seen_items`).
    seen_items: AtomicUsize,
}

impl HistoryStore {
    /// A store that keeps each user's `bound` most recent events (the model's history length),
    /// ordered as the training data was (`dataset.json`'s tie order), and windowed by the
    /// training data's history protocol.
    pub fn new(bound: usize, ties: TieOrder, protocol: HistoryProtocol) -> HistoryStore {
        HistoryStore {
            bound: bound.max(1),
            ties,
            protocol,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            users: AtomicUsize::new(0),
            seen_items: AtomicUsize::new(0),
        }
    }

    fn shard(&self, user_id: u64) -> &RwLock<HashMap<u64, UserState>> {
        &self.shards[(features::tokenizer::mix64(user_id) % SHARDS as u64) as usize]
    }

    /// Events kept per user.
    pub fn bound(&self) -> usize {
        self.bound
    }

    /// How events at equal timestamps are ordered.
    pub fn ties(&self) -> TieOrder {
        self.ties
    }

    /// Which events before the request time are history.
    pub fn protocol(&self) -> HistoryProtocol {
        self.protocol
    }

    /// Adds one event. Events may arrive out of time order; each lands in its canonical place
    /// (after the events it ties with under [`TieOrder::Source`]: arrival order).
    pub fn record(&self, user_id: u64, event: StoredEvent) {
        self.with_user(user_id, |user| self.record_into(user, event));
    }

    /// Runs `f` on a user's state under its shard's write lock, creating (and counting) it.
    fn with_user<R>(&self, user_id: u64, f: impl FnOnce(&mut UserState) -> R) -> R {
        let mut shard = self
            .shard(user_id)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let user = shard.entry(user_id).or_insert_with(|| {
            self.users.fetch_add(1, Ordering::Relaxed);
            UserState::default()
        });
        f(user)
    }

    fn record_into(&self, user: &mut UserState, event: StoredEvent) {
        if let Some(item) = event.item_id {
            if !user.seen.contains(item) && Arc::make_mut(&mut user.seen).insert(item) {
                self.seen_items.fetch_add(1, Ordering::Relaxed);
            }
        }
        let recent = &mut user.recent;
        // Most events are the newest: the search from the back is O(1) for them.
        let at = recent.len()
            - recent
                .iter()
                .rev()
                .take_while(|e| self.ties.compare(*e, &event).is_gt())
                .count();
        if at == 0 && recent.len() >= self.bound {
            return; // older than everything kept
        }
        recent.insert(at, event);
        while recent.len() > self.bound {
            recent.pop_front();
        }
    }

    /// Adds items to a user's seen set without events (state restored by a compacted log).
    pub fn add_seen(&self, user_id: u64, items: &[u64]) {
        self.with_user(user_id, |user| {
            let seen = Arc::make_mut(&mut user.seen);
            let before = seen.len();
            seen.extend(items.iter().copied());
            self.seen_items
                .fetch_add(seen.len() - before, Ordering::Relaxed);
        });
    }

    /// Calls `f` with every user's kept events (oldest first) and seen items, one shard at a
    /// time (compaction).
    pub fn for_each_user(&self, mut f: impl FnMut(u64, &VecDeque<StoredEvent>, &SeenItems)) {
        for shard in &self.shards {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            for (&user_id, state) in shard.iter() {
                f(user_id, &state.recent, &state.seen);
            }
        }
    }

    /// Sets a user's profile features.
    pub fn set_features(&self, user_id: u64, features: Vec<String>) {
        self.with_user(user_id, |user| user.features = features.into());
    }

    /// The user's stored events strictly before `before_ms`, seen items and features.
    pub fn view(&self, user_id: u64, before_ms: i64) -> UserView {
        let shard = self
            .shard(user_id)
            .read()
            .unwrap_or_else(|p| p.into_inner());
        match shard.get(&user_id) {
            None => UserView::default(),
            Some(u) => UserView {
                events: u
                    .recent
                    .iter()
                    .filter(|e| e.ts_ms < before_ms)
                    .cloned()
                    .collect(),
                seen: u.seen.clone(),
                features: u.features.clone(),
            },
        }
    }

    /// Number of users with any event or feature.
    pub fn user_count(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    /// Seen items summed over users (each user's distinct items).
    pub fn seen_count(&self) -> usize {
        self.seen_items.load(Ordering::Relaxed)
    }

    /// Whether the store holds `user_id`.
    pub fn contains(&self, user_id: u64) -> bool {
        self.shard(user_id)
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: i64, item: Option<u64>) -> StoredEvent {
        StoredEvent {
            ts_ms: ts,
            event_type: if item.is_some() {
                EventType::View
            } else {
                EventType::Search
            },
            item_id: item,
            query: item.is_none().then(|| Arc::from("q")),
        }
    }

    #[test]
    fn keeps_the_latest_events_in_canonical_order_and_every_seen_item() {
        let store = HistoryStore::new(3, TieOrder::ItemId, HistoryProtocol::Strict);
        for (ts, item) in [
            (5, Some(50)),
            (1, Some(10)),
            (3, None),
            (4, Some(40)),
            (2, Some(20)),
        ] {
            store.record(7, ev(ts, item));
        }
        let v = store.view(7, i64::MAX);
        let ts: Vec<i64> = v.events.iter().map(|e| e.ts_ms).collect();
        assert_eq!(ts, [3, 4, 5]);
        let seen: Vec<u64> = v.seen.iter().collect();
        assert_eq!(seen, [10, 20, 40, 50]);
        // Strictly before the request time.
        let ts: Vec<i64> = store.view(7, 5).events.iter().map(|e| e.ts_ms).collect();
        assert_eq!(ts, [3, 4]);
        // Equal timestamps: searches first, then ascending item id.
        store.record(8, ev(1, Some(9)));
        store.record(8, ev(1, None));
        store.record(8, ev(1, Some(3)));
        let items: Vec<_> = store.view(8, 2).events.iter().map(|e| e.item_id).collect();
        assert_eq!(items, [None, Some(3), Some(9)]);
        assert_eq!(store.user_count(), 2);
        assert!(store.view(99, 10).events.is_empty());
    }

    #[test]
    fn counts_each_users_distinct_seen_items_once() {
        let store = HistoryStore::new(2, TieOrder::ItemId, HistoryProtocol::Strict);
        for (user, item) in [(1, 10), (1, 10), (1, 11), (2, 10)] {
            store.record(user, ev(0, Some(item)));
        }
        store.record(1, ev(1, None));
        assert_eq!(store.seen_count(), 3);
        // Restored seen items count too, repeats among them and with recorded ones once.
        store.add_seen(2, &[10, 12, 12, 13]);
        assert_eq!(store.seen_count(), 5);
    }

    #[test]
    fn source_ties_keep_arrival_order() {
        let store = HistoryStore::new(4, TieOrder::Source, HistoryProtocol::Strict);
        for (ts, item) in [(1, Some(9)), (2, Some(7)), (1, None), (1, Some(3))] {
            store.record(8, ev(ts, item));
        }
        let items: Vec<_> = store.view(8, 3).events.iter().map(|e| e.item_id).collect();
        assert_eq!(items, [Some(9), None, Some(3), Some(7)]);
    }
}
