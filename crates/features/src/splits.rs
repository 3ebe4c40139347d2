//! Leak-free training, validation and test examples from each user's ordered events.
//!
//! An example asks: given everything this user did strictly before time `t`, which item do they
//! interact with at `t`? Targets are each user's *first* interaction with an item (repeat views,
//! carts and purchases of an item stay in the history as signals, but predicting an item the user
//! already touched is not retrieval, and full-ranking evaluation masks seen items anyway).
//!
//! Two protocols:
//! - **leave-last-out** (RecBole's `LS`/`TO`/`full`): per user, the last target is the test
//!   example, the second-last the validation example, every earlier one a training example;
//! - **time**: targets before `cutoff` train, those in `[cutoff, test_cutoff)` validate, later ones
//!   test.
//!
//! History is the last `history_len` events before the target ([`history_window`], which the
//! server calls too). Under the default [`HistoryProtocol::Strict`] only events with a timestamp
//! strictly before the target's count, so nothing from the target's own second (a basket, a
//! burst of ratings) leaks into its features; [`HistoryProtocol::Positional`] takes every event
//! ordered before the target, as RecBole and most papers do. With `cold_items`, a hashed
//! fraction of items is held out entirely: they never appear as a training target or in any
//! history, and can only be evaluation targets.

use serde::{Deserialize, Serialize};

use crate::records::{hour_and_weekday, Event, EventType, Example, HistoryEvent};
use crate::tokenizer::stable_hash;

/// How targets are assigned to train, valid and test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SplitStrategy {
    /// Per user: last target → test, second-last → valid, the rest → train.
    LeaveLastOut,
    /// Global time split, in ms since the epoch. Without `test_cutoff_ms`, evaluation targets
    /// are split in two at the middle of the time range after `cutoff_ms`.
    Time {
        cutoff_ms: i64,
        test_cutoff_ms: Option<i64>,
    },
}

/// How one user's events at the same timestamp are ordered.
///
/// Order matters at ties because leave-last-out takes the *last* target as the test example.
/// MovieLens users rate many movies within one second, so the choice decides which movie is held
/// out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TieOrder {
    /// Searches first, then ascending item id: the same order whatever order the source lists
    /// events in. In MovieLens, ids grow with the date a movie was added, so the held-out test
    /// target leans towards obscure movies.
    #[default]
    ItemId,
    /// The order of the source (a stable sort by time), as RecBole orders interactions. The
    /// MovieLens files list ratings in random order, so ties are broken at random.
    Source,
}

/// Which of the events ordered before a target form its history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryProtocol {
    /// Events with a timestamp strictly before the target's: the target's own second stays
    /// out, whatever the tie order put ahead of it. What a live system sees.
    #[default]
    Strict,
    /// Every event ordered before the target, ties at its timestamp included (RecBole's and
    /// most papers' protocol; pair it with [`TieOrder::Source`]).
    Positional,
}

impl HistoryProtocol {
    /// Whether an event at `event_ms`, ordered before a target at `target_ms`, is history.
    pub fn includes(self, event_ms: i64, target_ms: i64) -> bool {
        match self {
            HistoryProtocol::Strict => event_ms < target_ms,
            HistoryProtocol::Positional => event_ms <= target_ms,
        }
    }
}

/// The history window, the one definition training and serving share: of `ordered` (one
/// user's events in canonical order, all ordered before the target), those the protocol counts
/// as before `target_ms` and `keep` accepts, the last `len` of them, oldest first.
pub fn history_window<E: Timed>(
    ordered: &[E],
    target_ms: i64,
    protocol: HistoryProtocol,
    len: usize,
    keep: impl Fn(&E) -> bool,
) -> Vec<&E> {
    let mut window: Vec<&E> = ordered
        .iter()
        .rev()
        .filter(|e| protocol.includes(e.ts_ms(), target_ms) && keep(e))
        .take(len)
        .collect();
    window.reverse();
    window
}

/// An event as the canonical order sees it: its time, and what breaks ties by item id.
/// Implemented by [`Event`] here and by the server's stored events, so both order alike.
pub trait Timed {
    fn ts_ms(&self) -> i64;
    /// Searches (no item) first, then item id, type and query. Events equal in all of these
    /// (repeats) keep their order, since every sort of events is stable.
    fn tie_key(&self) -> (bool, Option<u64>, EventType, Option<&str>);
}

impl Timed for Event {
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

impl TieOrder {
    /// Compares two events of one user in canonical order: by time, then by this tie order.
    /// `Equal` under `Source` means "keep the order they came in", so sort with a stable sort.
    pub fn compare<E: Timed>(self, a: &E, b: &E) -> std::cmp::Ordering {
        let by_time = a.ts_ms().cmp(&b.ts_ms());
        match self {
            TieOrder::Source => by_time,
            TieOrder::ItemId => by_time.then_with(|| a.tie_key().cmp(&b.tie_key())),
        }
    }
}

/// Settings of example building, recorded in `dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    pub strategy: SplitStrategy,
    /// Order of events at equal timestamps (absent in older `dataset.json`: item id).
    #[serde(default)]
    pub ties: TieOrder,
    /// Which events before the target are its history (absent in older `dataset.json`: strict).
    #[serde(default)]
    pub history: HistoryProtocol,
    /// Maximum number of history events per example (L).
    pub history_len: usize,
    /// Fraction of items held out entirely as cold items (0 = none).
    pub cold_items: f64,
    /// Seed of the cold-item draw.
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            strategy: SplitStrategy::LeaveLastOut,
            ties: TieOrder::ItemId,
            history: HistoryProtocol::Strict,
            history_len: 50,
            cold_items: 0.0,
            seed: 42,
        }
    }
}

impl SplitConfig {
    /// Whether an item is in the held-out cold set. A hash, so any stage can ask without a list.
    pub fn is_cold(&self, item_id: u64) -> bool {
        if self.cold_items <= 0.0 {
            return false;
        }
        let h = stable_hash(&format!("{}:{item_id}", self.seed));
        (h as f64 / u64::MAX as f64) < self.cold_items
    }
}

/// Which split an example belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// Sorts one user's events into canonical order: by time, ties as `ties` says. The sort is
/// stable, so under [`TieOrder::Source`] events must come in source order.
pub fn sort_user_events(events: &mut [Event], ties: TieOrder) {
    events.sort_by(|a, b| ties.compare(a, b));
}

/// Builds the examples of one user. `events` must be sorted with [`sort_user_events`].
/// Calls `emit` once per example, in time order.
pub fn user_examples(
    cfg: &SplitConfig,
    user_id: u64,
    user_features: &[String],
    events: &[Event],
    mut emit: impl FnMut(Split, Example),
) {
    let targets = target_positions(events);
    let n = targets.len();
    for (rank, &pos) in targets.iter().enumerate() {
        let target = &events[pos];
        let item = target.item_id.expect("targets have items");
        let split = match cfg.strategy {
            SplitStrategy::LeaveLastOut => match n - 1 - rank {
                0 if n >= 2 => Split::Test,
                1 if n >= 3 => Split::Valid,
                _ => Split::Train,
            },
            SplitStrategy::Time {
                cutoff_ms,
                test_cutoff_ms,
            } => {
                let test_cutoff_ms = test_cutoff_ms.expect("prepare resolves the test cutoff");
                if target.ts_ms < cutoff_ms {
                    Split::Train
                } else if target.ts_ms < test_cutoff_ms {
                    Split::Valid
                } else {
                    Split::Test
                }
            }
        };
        if split == Split::Train && cfg.is_cold(item) {
            continue;
        }
        let (hour, weekday) = hour_and_weekday(target.ts_ms);
        emit(
            split,
            Example {
                user_id,
                ts_ms: target.ts_ms,
                target_item_id: item,
                history: history_before(cfg, events, pos),
                hour,
                weekday,
                user_features: user_features.to_vec(),
            },
        );
    }
}

/// Positions of the user's first interaction with each item.
fn target_positions(events: &[Event]) -> Vec<usize> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.item_id.is_some_and(|id| seen.insert(id)))
        .map(|(i, _)| i)
        .collect()
}

/// The history of the target `events[pos]`, without cold items.
fn history_before(cfg: &SplitConfig, events: &[Event], pos: usize) -> Vec<HistoryEvent> {
    let t = events[pos].ts_ms;
    let not_cold = |e: &Event| !e.item_id.is_some_and(|id| cfg.is_cold(id));
    history_window(&events[..pos], t, cfg.history, cfg.history_len, not_cold)
        .into_iter()
        .map(|e| HistoryEvent {
            event_type: e.event_type,
            item_id: e.item_id,
            query: e.query.clone(),
            gap_s: (t - e.ts_ms) / 1000,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: i64, item: Option<u64>) -> Event {
        let (event_type, query) = match item {
            Some(_) => (EventType::View, None),
            None => (EventType::Search, Some("q".to_string())),
        };
        Event {
            user_id: 1,
            ts_ms: ts * 1000,
            event_type,
            item_id: item,
            query,
            value: None,
        }
    }

    fn collect(cfg: &SplitConfig, events: &mut [Event]) -> Vec<(Split, Example)> {
        sort_user_events(events, cfg.ties);
        let mut out = Vec::new();
        user_examples(cfg, 1, &[], events, |s, e| out.push((s, e)));
        out
    }

    #[test]
    fn leave_last_out_assigns_last_two_targets() {
        let mut events = vec![
            ev(1, Some(10)),
            ev(2, None),
            ev(3, Some(11)),
            ev(4, Some(12)),
            ev(5, Some(13)),
        ];
        let out = collect(&SplitConfig::default(), &mut events);
        let splits: Vec<_> = out.iter().map(|(s, e)| (*s, e.target_item_id)).collect();
        assert_eq!(
            splits,
            [
                (Split::Train, 10),
                (Split::Train, 11),
                (Split::Valid, 12),
                (Split::Test, 13)
            ]
        );
        // The test example sees everything before it, oldest first, including the search.
        let test = &out[3].1;
        let items: Vec<_> = test.history.iter().map(|h| h.item_id).collect();
        assert_eq!(items, [Some(10), None, Some(11), Some(12)]);
        assert_eq!(test.history[0].gap_s, 4);
    }

    #[test]
    fn ties_order_by_item_id_and_never_enter_history() {
        let mut events = vec![ev(5, Some(30)), ev(5, Some(20)), ev(1, Some(10))];
        let out = collect(&SplitConfig::default(), &mut events);
        let test = out.iter().find(|(s, _)| *s == Split::Test).unwrap();
        assert_eq!(test.1.target_item_id, 30, "largest id last among ties");
        assert!(test.1.history.iter().all(|h| h.item_id == Some(10)));
    }

    #[test]
    fn source_ties_keep_the_source_order_and_never_enter_history() {
        let cfg = SplitConfig {
            ties: TieOrder::Source,
            ..Default::default()
        };
        let mut events = vec![
            ev(5, Some(30)),
            ev(1, Some(10)),
            ev(5, Some(20)),
            ev(3, None),
        ];
        let out = collect(&cfg, &mut events);
        let order: Vec<_> = events.iter().map(|e| e.item_id).collect();
        assert_eq!(order, [Some(10), None, Some(30), Some(20)]);
        let test = out.iter().find(|(s, _)| *s == Split::Test).unwrap();
        assert_eq!(
            test.1.target_item_id, 20,
            "the source's last tie is the test target"
        );
        let valid = out.iter().find(|(s, _)| *s == Split::Valid).unwrap();
        assert_eq!(valid.1.target_item_id, 30);
        let history: Vec<_> = test.1.history.iter().map(|h| h.item_id).collect();
        assert_eq!(
            history,
            [Some(10), None],
            "ties at the target's second stay out"
        );
    }

    #[test]
    fn positional_history_takes_the_ties_ordered_before_the_target() {
        let cfg = SplitConfig {
            ties: TieOrder::Source,
            history: HistoryProtocol::Positional,
            ..Default::default()
        };
        let mut events = vec![
            ev(1, Some(10)),
            ev(5, Some(30)),
            ev(5, Some(20)),
            ev(5, Some(40)),
        ];
        let out = collect(&cfg, &mut events);
        let test = out.iter().find(|(s, _)| *s == Split::Test).unwrap();
        assert_eq!(test.1.target_item_id, 40);
        let history: Vec<_> = test.1.history.iter().map(|h| h.item_id).collect();
        assert_eq!(
            history,
            [Some(10), Some(30), Some(20)],
            "ties before it count"
        );
        assert_eq!(test.1.history[2].gap_s, 0);
        let valid = out.iter().find(|(s, _)| *s == Split::Valid).unwrap();
        let history: Vec<_> = valid.1.history.iter().map(|h| h.item_id).collect();
        assert_eq!(
            history,
            [Some(10), Some(30)],
            "never a tie ordered after it"
        );
    }

    #[test]
    fn repeats_are_history_not_targets_and_history_is_bounded() {
        let mut events: Vec<_> = (0..10).map(|i| ev(i, Some(1 + i as u64 % 3))).collect();
        let cfg = SplitConfig {
            history_len: 2,
            ..Default::default()
        };
        let out = collect(&cfg, &mut events);
        assert_eq!(out.len(), 3, "one target per distinct item");
        assert!(out.iter().all(|(_, e)| e.history.len() <= 2));
    }

    #[test]
    fn cold_items_never_train_or_appear_in_history() {
        let cfg = SplitConfig {
            cold_items: 0.5,
            ..Default::default()
        };
        let mut events: Vec<_> = (0..200).map(|i| ev(i, Some(i as u64))).collect();
        let out = collect(&cfg, &mut events);
        assert!(out
            .iter()
            .any(|(s, e)| *s != Split::Train || !cfg.is_cold(e.target_item_id)));
        for (split, e) in &out {
            if *split == Split::Train {
                assert!(!cfg.is_cold(e.target_item_id));
            }
            assert!(e.history.iter().all(|h| !cfg.is_cold(h.item_id.unwrap())));
        }
        let cold = (0..1000).filter(|i| cfg.is_cold(*i)).count();
        assert!((400..600).contains(&cold), "{cold}");
    }

    #[test]
    fn time_split_uses_cutoffs() {
        let cfg = SplitConfig {
            strategy: SplitStrategy::Time {
                cutoff_ms: 3000,
                test_cutoff_ms: Some(5000),
            },
            ..Default::default()
        };
        let mut events: Vec<_> = (0..7).map(|i| ev(i, Some(i as u64))).collect();
        let out = collect(&cfg, &mut events);
        let splits: Vec<_> = out.iter().map(|(s, _)| *s).collect();
        use Split::*;
        assert_eq!(splits, [Train, Train, Train, Valid, Valid, Test, Test]);
    }
}
