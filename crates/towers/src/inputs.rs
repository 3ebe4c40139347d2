//! Model inputs: padded id arrays built on the host, then moved to the device as tensors.
//!
//! Building is split in two so a trainer can prepare the next batch on another thread
//! ([`ItemBatchHost`], [`UserBatchHost`] are plain vectors, `Send`) while the current one trains,
//! and only the cheap copy to the device happens on the training thread. The trainer, the indexer
//! and the server all build inputs here, so padding, truncation and time-gap bucketing have one
//! implementation.

use tch::{Device, Tensor};

use crate::config::TowerConfig;
use crate::recurrence::Packing;

/// Number of time-gap buckets (bucket 0 is padding).
pub const GAP_BUCKETS: i64 = 16;

/// Log-scale bucket of the time between a history event and the prediction time:
/// bucket 1 is under a minute, each next bucket doubles the span, the last is open-ended
/// (over ~11 days).
pub fn gap_bucket(gap_s: i64) -> i64 {
    let minutes = (gap_s.max(0) / 60) as f64;
    1 + ((1.0 + minutes).log2().floor() as i64).min(GAP_BUCKETS - 2)
}

/// Tokenized content of one item, as produced by `features::Vocabularies::item_tokens`.
pub use features::ItemTokens;

/// One history event of one user, ready for the user tower.
#[derive(Debug, Clone, PartialEq)]
pub struct EventInput {
    /// `features::EventType::code()`.
    pub event_type: i64,
    /// Row of the event's item in the item vectors passed to the user tower; `None` for a
    /// search (or an item the catalog no longer has).
    pub item_row: Option<i64>,
    /// Query word ids (searches only).
    pub query: Vec<i64>,
    /// Seconds from the event to the prediction time.
    pub gap_s: i64,
}

/// Everything the user tower reads about one user at one time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserInput {
    /// Oldest first; only the last `history_len` are used.
    pub history: Vec<EventInput>,
    pub hour: u8,
    pub weekday: u8,
    /// User-feature ids.
    pub user_features: Vec<i64>,
}

/// One event of a user's windowed history, before encoding: what a training example's history
/// and the server's store both hold.
#[derive(Debug, Clone, Copy)]
pub struct RawEvent<'a> {
    pub event_type: features::EventType,
    pub item_id: Option<u64>,
    pub query: Option<&'a str>,
    /// Whole seconds from the event to the prediction time.
    pub gap_s: i64,
}

impl UserInput {
    /// Encodes a user's windowed history and context into tower input. This is the one place
    /// where events become ids, for training, evaluation and serving alike: the event type's
    /// code, the item's row in the item vectors the tower will read (`row_of`; an item without
    /// one becomes a type-only event, like a search), the query's word ids, the gap; the hour
    /// and weekday of the prediction time and the user-feature ids.
    pub fn encode<'a>(
        history: impl IntoIterator<Item = RawEvent<'a>>,
        (hour, weekday): (u8, u8),
        user_features: &[String],
        vocabs: &features::Vocabularies,
        row_of: impl Fn(u64) -> Option<i64>,
    ) -> UserInput {
        UserInput {
            history: history
                .into_iter()
                .map(|e| EventInput {
                    event_type: e.event_type.code(),
                    item_row: e.item_id.and_then(&row_of),
                    query: e.query.map(|q| vocabs.query_tokens(q)).unwrap_or_default(),
                    gap_s: e.gap_s,
                })
                .collect(),
            hour,
            weekday,
            user_features: vocabs.user_feature_ids(user_features),
        }
    }
}

fn pad(
    rows: impl ExactSizeIterator<Item = impl AsRef<[i64]>>,
    width: usize,
) -> (Vec<i64>, [i64; 2]) {
    let n = rows.len();
    let mut out = vec![0i64; n * width];
    for (r, row) in rows.enumerate() {
        let row = row.as_ref();
        let k = row.len().min(width);
        out[r * width..r * width + k].copy_from_slice(&row[..k]);
    }
    (out, [n as i64, width as i64])
}

fn tensor(data: &[i64], shape: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(data).view(shape).to_device(device)
}

/// Padded item content on the host.
#[derive(Debug, Clone)]
pub struct ItemBatchHost {
    title: (Vec<i64>, [i64; 2]),
    aspects: (Vec<i64>, [i64; 2]),
    categories: (Vec<i64>, [i64; 2]),
    ids: Vec<i64>,
}

impl ItemBatchHost {
    pub fn new(items: &[&ItemTokens], cfg: &TowerConfig) -> Self {
        ItemBatchHost {
            title: pad(items.iter().map(|i| &i.title), cfg.max_title_tokens),
            aspects: pad(items.iter().map(|i| &i.aspects), cfg.max_aspects),
            categories: pad(items.iter().map(|i| &i.categories), cfg.max_categories),
            ids: items.iter().map(|i| i.id).collect(),
        }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn to_device(&self, device: Device) -> ItemInputs {
        ItemInputs {
            title: tensor(&self.title.0, &self.title.1, device),
            aspects: tensor(&self.aspects.0, &self.aspects.1, device),
            categories: tensor(&self.categories.0, &self.categories.1, device),
            ids: tensor(&self.ids, &[self.ids.len() as i64], device),
        }
    }
}

/// Item content as tensors: `[N, T]` int64 ids, 0-padded, and `[N]` item-id rows (0: none).
#[derive(Debug)]
pub struct ItemInputs {
    pub title: Tensor,
    pub aspects: Tensor,
    pub categories: Tensor,
    pub ids: Tensor,
}

impl ItemInputs {
    pub fn len(&self) -> i64 {
        self.title.size()[0]
    }

    /// Items `start..start + len` (views, no copy).
    pub fn rows(&self, start: i64, len: i64) -> ItemInputs {
        ItemInputs {
            title: self.title.narrow(0, start, len),
            aspects: self.aspects.narrow(0, start, len),
            categories: self.categories.narrow(0, start, len),
            ids: self.ids.narrow(0, start, len),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The vectors of the items a batch of histories points at, each gathered once.
///
/// The user tower reads history items as rows of an `[n, dim]` tensor. Passing the whole catalog
/// (a million rows) for a handful of users would copy gigabytes, so callers gather just the rows
/// used and renumber the histories' `item_row`s into this small table.
#[derive(Debug, Default)]
pub struct GatheredItems {
    local: std::collections::HashMap<u32, i64>,
    vectors: Vec<f32>,
}

impl GatheredItems {
    /// The local row of catalog row `row` of `embeddings`, copying its vector on first use.
    pub fn local_row(&mut self, row: u32, embeddings: &features::Embeddings) -> i64 {
        let next = self.local.len() as i64;
        *self.local.entry(row).or_insert_with(|| {
            self.vectors
                .extend_from_slice(embeddings.vector(row as usize));
            next
        })
    }

    /// `[n, dim]` on `device` (n may be 0: the user tower handles histories without items).
    pub fn to_tensor(&self, dim: usize, device: Device) -> Result<Tensor, tch::TchError> {
        Tensor::f_from_slice(&self.vectors)?
            .f_view([self.local.len() as i64, dim as i64])?
            .f_to_device(device)
    }
}

/// Right-padded user histories and context on the host.
#[derive(Debug, Clone)]
pub struct UserBatchHost {
    batch: i64,
    len: i64,
    query_len: i64,
    hist_item: Vec<i64>,
    hist_is_item: Vec<f32>,
    hist_query: Vec<i64>,
    hist_type: Vec<i64>,
    hist_gap: Vec<i64>,
    hist_len: Vec<i64>,
    hour: Vec<i64>,
    weekday: Vec<i64>,
    user_features: (Vec<i64>, [i64; 2]),
}

impl UserBatchHost {
    pub fn new(users: &[UserInput], cfg: &TowerConfig) -> Self {
        let b = users.len();
        let l = users
            .iter()
            .map(|u| u.history.len().min(cfg.history_len))
            .max()
            .unwrap_or(0);
        // Without any search in the batch the query slots would be all padding: drop them, so
        // the user tower skips the query path (most of its memory traffic on ratings data).
        let any_query = users
            .iter()
            .any(|u| u.history.iter().any(|e| !e.query.is_empty()));
        let q = if any_query { cfg.max_query_tokens } else { 0 };
        let mut h = UserBatchHost {
            batch: b as i64,
            len: l as i64,
            query_len: q as i64,
            hist_item: vec![0; b * l],
            hist_is_item: vec![0.0; b * l],
            hist_query: vec![0; b * l * q],
            hist_type: vec![0; b * l],
            hist_gap: vec![0; b * l],
            hist_len: Vec::with_capacity(b),
            hour: users.iter().map(|u| u.hour as i64 % 24).collect(),
            weekday: users.iter().map(|u| u.weekday as i64 % 7).collect(),
            user_features: pad(
                users.iter().map(|u| &u.user_features),
                cfg.max_user_features,
            ),
        };
        for (r, user) in users.iter().enumerate() {
            let start = user.history.len().saturating_sub(cfg.history_len);
            let events = &user.history[start..];
            h.hist_len.push(events.len() as i64);
            for (t, e) in events.iter().enumerate() {
                let at = r * l + t;
                h.hist_type[at] = e.event_type;
                h.hist_gap[at] = gap_bucket(e.gap_s);
                if let Some(row) = e.item_row {
                    h.hist_item[at] = row;
                    h.hist_is_item[at] = 1.0;
                }
                let k = e.query.len().min(q);
                h.hist_query[at * q..at * q + k].copy_from_slice(&e.query[..k]);
            }
        }
        h
    }

    /// Whether every real history event is an item event (no searches, no items the table
    /// lacks): then `hist_is_item` masks nothing the user tower reads.
    fn every_event_is_item(&self) -> bool {
        let l = self.len as usize;
        self.hist_len.iter().enumerate().all(|(r, &n)| {
            self.hist_is_item[r * l..][..n as usize]
                .iter()
                .all(|&x| x == 1.0)
        })
    }

    /// History events in the batch after truncation to `history_len`, known without a device sync.
    pub fn history_events(&self) -> i64 {
        self.hist_len.iter().sum()
    }

    pub fn to_device(&self, device: Device) -> UserInputs {
        let (b, l, q) = (self.batch, self.len, self.query_len);
        let packing = Packing::of(&self.hist_len, l);
        UserInputs {
            hist_packed: tensor(&packing.events, &[packing.events.len() as i64], device),
            hist_rank: tensor(&packing.rank, &[b], device),
            hist_running: packing.running,
            hist_item: tensor(&self.hist_item, &[b, l], device),
            hist_is_item: Tensor::from_slice(&self.hist_is_item)
                .view([b, l, 1])
                .to_device(device),
            every_event_is_item: self.every_event_is_item(),
            hist_query: tensor(&self.hist_query, &[b, l, q], device),
            hist_type: tensor(&self.hist_type, &[b, l], device),
            hist_gap: tensor(&self.hist_gap, &[b, l], device),
            hist_len: tensor(&self.hist_len, &[b], device),
            hour: tensor(&self.hour, &[b], device),
            weekday: tensor(&self.weekday, &[b], device),
            user_features: tensor(&self.user_features.0, &self.user_features.1, device),
        }
    }
}

/// User histories and context as tensors. Histories are right-padded: the GRU output is read at
/// each row's last real step, so padding never reaches the state the tower uses.
#[derive(Debug)]
pub struct UserInputs {
    /// `[B, L]` rows into the item vectors (0 where not an item event).
    pub hist_item: Tensor,
    /// `[B, L, 1]` float, 1 for item events.
    pub hist_is_item: Tensor,
    /// Whether `hist_is_item` is 1 at every real event (known on the host): the towers then
    /// skip multiplying by it, which on ratings and purchase data is two `[events, ·]` products
    /// forward and two backward per batch. Padding needs no mask: nothing reads it.
    pub every_event_is_item: bool,
    /// `[B, L, Q]` query word ids.
    pub hist_query: Tensor,
    /// `[B, L]` event type codes, 0 = padding.
    pub hist_type: Tensor,
    /// `[B, L]` time-gap buckets, 0 = padding.
    pub hist_gap: Tensor,
    /// `[B]` number of real events per row.
    pub hist_len: Tensor,
    /// `[E]` the batch's real events as positions in the flattened `[B · L]` history, packed:
    /// step by step, and within a step the rows longest history first (stable). The order the
    /// CPU recurrence runs them in; padding is not there.
    pub hist_packed: Tensor,
    /// `[B]` each row's position in that longest-first order.
    pub hist_rank: Tensor,
    /// For each of the `L` steps, how many rows have more events than that: the number of
    /// `hist_packed` entries of that step, whose rows are the first of the longest-first order.
    /// Kept on the host, so no step waits on the device.
    pub hist_running: Vec<i64>,
    pub hour: Tensor,
    pub weekday: Tensor,
    /// `[B, F]` user-feature ids.
    pub user_features: Tensor,
}

impl UserInputs {
    pub fn batch_size(&self) -> i64 {
        self.hist_len.size()[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_buckets_are_monotone_and_bounded() {
        assert_eq!(gap_bucket(0), 1);
        assert_eq!(gap_bucket(59), 1);
        assert_eq!(gap_bucket(60), 2);
        assert_eq!(gap_bucket(-5), 1);
        let mut prev = 0;
        for s in [0, 60, 600, 3600, 86_400, 864_000, 100_000_000, i64::MAX / 2] {
            let b = gap_bucket(s);
            assert!(b >= prev && (1..GAP_BUCKETS).contains(&b), "{s} -> {b}");
            prev = b;
        }
    }

    #[test]
    fn user_batch_keeps_most_recent_events_and_right_pads() {
        let cfg = TowerConfig {
            history_len: 2,
            max_query_tokens: 2,
            ..Default::default()
        };
        let ev = |t: i64, row: Option<i64>| EventInput {
            event_type: t,
            item_row: row,
            query: vec![7, 8, 9],
            gap_s: 0,
        };
        let users = vec![
            UserInput {
                history: vec![ev(1, Some(5)), ev(2, None), ev(3, Some(6))],
                ..Default::default()
            },
            UserInput::default(),
        ];
        let inputs = UserBatchHost::new(&users, &cfg).to_device(Device::Cpu);
        assert_eq!(inputs.hist_type.size(), [2, 2]);
        assert_eq!(
            Vec::<i64>::try_from(inputs.hist_type.flatten(0, -1)).unwrap(),
            [2, 3, 0, 0]
        );
        assert_eq!(
            Vec::<i64>::try_from(inputs.hist_item.flatten(0, -1)).unwrap(),
            [0, 6, 0, 0]
        );
        assert_eq!(Vec::<i64>::try_from(inputs.hist_len).unwrap(), [2, 0]);
        assert_eq!(
            Vec::<i64>::try_from(inputs.hist_query.get(0).get(0)).unwrap(),
            [7, 8],
            "query truncated"
        );
    }

    #[test]
    fn gathered_items_copy_each_row_once_in_first_use_order() {
        let emb = features::Embeddings {
            dim: 2,
            ids: vec![10, 20, 30],
            vectors: vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5],
        };
        let mut g = GatheredItems::default();
        let rows: Vec<i64> = [2, 0, 2, 1, 0]
            .iter()
            .map(|&r| g.local_row(r, &emb))
            .collect();
        assert_eq!(rows, [0, 1, 0, 2, 1]);
        let t = g.to_tensor(2, Device::Cpu).unwrap();
        assert_eq!(t.size(), [3, 2]);
        let v = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        assert_eq!(v, [3.0, 3.5, 1.0, 1.5, 2.0, 2.5]);
        let empty = GatheredItems::default().to_tensor(2, Device::Cpu).unwrap();
        assert_eq!(empty.size(), [0, 2]);
    }
}
