//! The user tower's input for a request, built exactly like a training example's.
//!
//! Training (`features::splits`) reads the last L events before the target time
//! (`features::splits::history_window`, under the dataset's history protocol), in canonical
//! order, with each event's gap to the target in whole seconds, the target's hour and weekday,
//! and the user's profile features. Serving calls the same window with the request time in place
//! of the target time, over the stored history merged with the request's inline events.
//! History items missing from the index become type-only events, as in training. (Training also
//! drops the held-out cold items from histories; that is an evaluation protocol, not a feature,
//! so serving keeps them.)

use features::records::hour_and_weekday;
use towers::inputs::RawEvent;
use towers::UserInput;

use features::splits::{history_window, HistoryProtocol, TieOrder};

use crate::history::{sort_canonical, StoredEvent};
use crate::snapshot::Snapshot;

/// Merges stored and inline events, sorts them canonically (inline after stored at a tie, when
/// ties keep arrival order), drops inline events that copy a stored one (a client resending
/// what it already recorded) and returns the history window before `ts_ms`. Repeats within the stored history, or within the inline events, stay:
/// training keeps them.
pub fn merge_history(
    stored: Vec<StoredEvent>,
    inline: &[features::Event],
    ts_ms: i64,
    history_len: usize,
    ties: TieOrder,
    protocol: HistoryProtocol,
) -> Vec<StoredEvent> {
    let mut all = stored;
    let stored_len = all.len();
    // Each stored event absorbs at most one inline copy (a copy has the same time, so it falls
    // inside or outside the window with it: the window alone decides what is history).
    let mut absorbed = vec![false; stored_len];
    for e in inline.iter().map(StoredEvent::from_event) {
        let copy = (0..stored_len).find(|&i| !absorbed[i] && all[i] == e);
        match copy {
            Some(i) => absorbed[i] = true,
            None => all.push(e),
        }
    }
    sort_canonical(&mut all, ties);
    history_window(&all, ts_ms, protocol, history_len, |_| true)
        .into_iter()
        .cloned()
        .collect()
}

/// The tower input, through the encoder training uses ([`UserInput::encode`]); `item_row`s
/// are rows of the snapshot's index embeddings, gaps count from `ts_ms`.
pub fn user_input(
    snap: &Snapshot,
    history: &[StoredEvent],
    ts_ms: i64,
    user_features: &[String],
) -> UserInput {
    let row_of = &snap.index.version.row_of;
    UserInput::encode(
        history.iter().map(|e| RawEvent {
            event_type: e.event_type,
            item_id: e.item_id,
            query: e.query.as_deref(),
            gap_s: (ts_ms - e.ts_ms) / 1000,
        }),
        hour_and_weekday(ts_ms),
        user_features,
        &snap.model.vocabs,
        |id| row_of.get(&id).map(|&r| r as i64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use features::{Event, EventType};

    fn ev(ts: i64, item: u64) -> Event {
        Event {
            user_id: 1,
            ts_ms: ts,
            event_type: EventType::View,
            item_id: Some(item),
            query: None,
            value: None,
        }
    }

    #[test]
    fn merged_history_is_strictly_before_sorted_deduplicated_and_bounded() {
        let stored: Vec<StoredEvent> = [ev(1, 1), ev(5, 5)]
            .iter()
            .map(StoredEvent::from_event)
            .collect();
        let inline = [ev(3, 3), ev(5, 5), ev(9, 9), ev(4, 4)];
        for ties in [TieOrder::ItemId, TieOrder::Source] {
            let h = merge_history(stored.clone(), &inline, 9, 3, ties, HistoryProtocol::Strict);
            let ts: Vec<i64> = h.iter().map(|e| e.ts_ms).collect();
            assert_eq!(ts, [3, 4, 5], "{ties:?}");
        }
    }

    #[test]
    fn source_ties_put_inline_events_after_stored_ones_and_drop_copies() {
        let stored: Vec<StoredEvent> = [ev(2, 8), ev(2, 6)]
            .iter()
            .map(StoredEvent::from_event)
            .collect();
        let inline = [ev(2, 1), ev(2, 8), ev(2, 8)];
        let h = merge_history(
            stored.clone(),
            &inline,
            9,
            10,
            TieOrder::Source,
            HistoryProtocol::Strict,
        );
        let items: Vec<_> = h.iter().map(|e| e.item_id.unwrap()).collect();
        assert_eq!(
            items,
            [8, 6, 1, 8],
            "one inline copy absorbed, the second is a repeat"
        );
        // Repeats already in the stored history are kept, as in training.
        let h = merge_history(
            [stored.clone(), stored].concat(),
            &[],
            9,
            10,
            TieOrder::Source,
            HistoryProtocol::Strict,
        );
        assert_eq!(h.len(), 4);
        // Positional: an event at the request time itself is history.
        let h = merge_history(
            [ev(9, 9)].iter().map(StoredEvent::from_event).collect(),
            &[],
            9,
            10,
            TieOrder::Source,
            HistoryProtocol::Positional,
        );
        assert_eq!(h.len(), 1);
    }
}
