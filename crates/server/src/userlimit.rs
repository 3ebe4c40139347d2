//! The bound on users the history store holds (`max_users`).
//!
//! A request handler checks its batch against the store as the request arrives, so that most
//! refusals cost no trip to the event log. That check alone is not a bound: batches in flight at
//! once are each checked against the same count, and between them they can take the store past
//! `max_users` by as many new users as they carry. So the event-log writer, which commits batches
//! one group at a time on one thread, checks each batch again before writing it, counting the new
//! users of the batches committed before it in the same group. On the event bus, replicas apply
//! each other's events, so there the bound is each replica's refusal of new users, checked as the
//! request arrives.

use std::collections::HashSet;

use features::Event;

use crate::history::HistoryStore;

/// Checks batches of events against `max_users`, counting the new users of the batches it has
/// let through (which the store does not hold yet while their group is being written).
pub struct UserLimit<'a> {
    store: &'a HistoryStore,
    max: usize,
    /// Users that batches let through add, beyond those the store holds.
    added: HashSet<u64>,
}

impl<'a> UserLimit<'a> {
    pub fn new(store: &'a HistoryStore, max: usize) -> Self {
        UserLimit {
            store,
            max,
            added: HashSet::new(),
        }
    }

    /// Whether `events` more events fit even if each came from a new user: then no batch of
    /// them needs its users looked up.
    pub fn has_room_for(&self, events: usize) -> bool {
        self.store.user_count() + self.added.len() + events <= self.max
    }

    /// Lets `events` through, or says (naming `max_users`) why a batch that adds users past the
    /// bound is refused. A batch of users already held always passes.
    pub fn admit(&mut self, events: &[Event]) -> Result<(), String> {
        let held = self.store.user_count() + self.added.len();
        let mut new: Vec<u64> = events
            .iter()
            .map(|e| e.user_id)
            .filter(|u| !self.added.contains(u) && !self.store.contains(*u))
            .collect();
        new.sort_unstable();
        new.dedup();
        if !new.is_empty() && held + new.len() > self.max {
            return Err(format!(
                "users: the server holds (or is adding) {held} users and this batch adds {} new ones, more than max_users = {}",
                new.len(),
                self.max
            ));
        }
        self.added.extend(new);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::StoredEvent;
    use features::splits::{HistoryProtocol, TieOrder};

    fn view(user_id: u64) -> Event {
        Event {
            user_id,
            ts_ms: 1_000,
            event_type: features::EventType::View,
            item_id: Some(7),
            query: None,
            value: None,
        }
    }

    fn store_with(users: &[u64]) -> HistoryStore {
        let store = HistoryStore::new(8, TieOrder::ItemId, HistoryProtocol::Strict);
        for &u in users {
            store.record(u, StoredEvent::from_event(&view(u)));
        }
        store
    }

    #[test]
    fn batches_checked_together_count_each_others_new_users() {
        let store = store_with(&[1, 2]);
        let mut limit = UserLimit::new(&store, 4);
        limit.admit(&[view(3), view(1)]).unwrap();
        // Checked against the store alone, user 5 would fit (2 held + 2 new = 4).
        limit.admit(&[view(3), view(2)]).unwrap();
        let err = limit.admit(&[view(4), view(5)]).unwrap_err();
        assert!(
            err.contains("(or is adding) 3 users")
                && err.contains("adds 2 new")
                && err.contains("max_users = 4"),
            "{err}"
        );
        limit.admit(&[view(4)]).unwrap();
        // Full: users already held (or added in this group) still record; a new one does not.
        limit.admit(&[view(1), view(3), view(4)]).unwrap();
        assert!(limit.admit(&[view(6)]).is_err());
    }

    #[test]
    fn room_is_counted_as_if_every_event_were_a_new_user() {
        let store = store_with(&[1]);
        let mut limit = UserLimit::new(&store, 4);
        assert!(limit.has_room_for(3));
        assert!(!limit.has_room_for(4));
        limit.admit(&[view(2)]).unwrap();
        assert!(!limit.has_room_for(3));
    }
}
