//! The baselines every evaluation reports next to the model, so a reader sees at a glance
//! whether the neural model is worth it: all-time popularity, recent popularity and item-to-item
//! co-occurrence (item-kNN).
//!
//! All three are fitted on the training examples only (their targets, which are each user's
//! first interactions with an item), and are ranked with the same examples and masking as the
//! model (`ranking::evaluate`).

use std::collections::HashMap;
use std::path::Path;

use features::splits::{SplitConfig, SplitStrategy};
use features::{Event, TableReader};
use tch::{Device, Kind, Tensor};
use towers::dataset::{Catalog, Dataset, EncodedExample, ExampleSet, NONE};

use crate::error::Result;

/// Days of interactions that recent popularity counts, ending where training ends.
///
/// Four weeks: long enough that a grocery shop's weekly rhythm averages out and most active
/// items have counts, short enough to follow seasons and promotions.
pub const RECENT_DAYS: i64 = 28;

/// Where training ends: the time split's cut-off, else (leave-last-out, where each user's
/// evaluation targets are their own last events) just after the last training target.
pub fn training_end_ms(split: &SplitConfig, train: &ExampleSet) -> i64 {
    match split.strategy {
        SplitStrategy::Time { cutoff_ms, .. } => cutoff_ms,
        SplitStrategy::LeaveLastOut => train
            .examples
            .iter()
            .map(|e| e.ts_ms.saturating_add(1))
            .max()
            .unwrap_or(0),
    }
}

/// Interactions per catalog row in `[since_ms, until_ms)`: every event with an item, repeats
/// included (what sold, not only first purchases), from `events.parquet`.
pub fn interaction_counts(
    events: &Path,
    catalog: &Catalog,
    since_ms: i64,
    until_ms: i64,
) -> Result<Vec<u64>> {
    let mut counts = vec![0u64; catalog.len()];
    for batch in TableReader::<Event>::open(events)? {
        for e in batch? {
            if (since_ms..until_ms).contains(&e.ts_ms) {
                if let Some(&row) = e.item_id.and_then(|id| catalog.row_of.get(&id)) {
                    counts[row as usize] += 1;
                }
            }
        }
    }
    Ok(counts)
}

/// Training-target count per catalog row: what all-time popularity ranks by.
pub fn target_counts(train: &ExampleSet, catalog_len: usize) -> Vec<u64> {
    let mut counts = vec![0u64; catalog_len];
    for ex in &train.examples {
        counts[ex.target_row as usize] += 1;
    }
    counts
}

/// Scores that order the catalog by the given keys (higher first; ties by catalog row): minus
/// each item's position, so the order is strict and exact in f32.
fn order_scores(catalog_len: usize, mut key: impl FnMut(usize) -> (u64, u64)) -> Vec<f32> {
    let mut order: Vec<usize> = (0..catalog_len).collect();
    order.sort_by_cached_key(|&row| (std::cmp::Reverse(key(row)), row));
    let mut scores = vec![0f32; catalog_len];
    for (position, row) in order.into_iter().enumerate() {
        scores[row] = -(position as f32);
    }
    scores
}

/// All-time popularity: training-target count (`all`, from [`target_counts`]), descending.
pub fn popularity_scores(all: &[u64], device: Device) -> Tensor {
    Tensor::from_slice(&order_scores(all.len(), |r| (all[r], 0))).to_device(device)
}

/// Recent popularity: interactions over the last [`RECENT_DAYS`] before training ends
/// (`recent`, from [`interaction_counts`]), ties (items that sold nothing lately) broken by
/// all-time popularity (`all`).
pub fn recent_popularity_scores(recent: &[u64], all: &[u64], device: Device) -> Tensor {
    Tensor::from_slice(&order_scores(recent.len(), |r| (recent[r], all[r]))).to_device(device)
}

/// The three baselines, fitted once on the training examples.
pub struct Baselines {
    pub popularity: Tensor,
    pub recent_popularity: Tensor,
    pub item_knn: ItemKnn,
}

impl Baselines {
    /// Fits the baselines on a dataset's training examples (`train`) and, for recent
    /// popularity, its events before training ends.
    pub fn fit(data: &Dataset, train: &ExampleSet, device: Device) -> Result<Baselines> {
        let n = data.catalog.len();
        let end = training_end_ms(&data.info.settings.split, train);
        let since = end.saturating_sub(RECENT_DAYS * 86_400_000);
        let recent = interaction_counts(&data.layout().events(), &data.catalog, since, end)?;
        let all = target_counts(train, n);
        let popularity = popularity_scores(&all, device);
        Ok(Baselines {
            recent_popularity: recent_popularity_scores(&recent, &all, device),
            item_knn: ItemKnn::fit(train, &popularity),
            popularity,
        })
    }
}

/// Who bought what in training: per catalog row, the dense indices (numbered in order of first
/// appearance) of the users it was a training target of, sorted and without repeats; and the
/// number of users. What item-kNN and the co-occurrence start of item ids (`cooccurrence.rs`)
/// both build on.
pub fn training_buyers(train: &ExampleSet, catalog_len: usize) -> (Vec<Vec<u32>>, usize) {
    let mut user_index: HashMap<u64, u32> = HashMap::new();
    let mut users_of: Vec<Vec<u32>> = vec![Vec::new(); catalog_len];
    for ex in &train.examples {
        let next = user_index.len() as u32;
        let u = *user_index.entry(ex.user_id).or_insert(next);
        users_of[ex.target_row as usize].push(u);
    }
    for users in &mut users_of {
        users.sort_unstable();
        users.dedup();
    }
    (users_of, user_index.len())
}

/// Item-to-item co-occurrence: the cosine between two items' sets of training users,
/// `|U_i ∩ U_j| / sqrt(|U_i| |U_j|)`, summed over the items of the user's history.
///
/// The item × item matrix is never built (92k² entries on shop data). With `X` the binary
/// user × item matrix of training targets and `n` the users per item, a history `h` scores
/// `s = (h / √n) Xᵀ X / √n`: one pass over the history items' users on the host, then one sparse
/// product per batch. Items that share no user with the history score below every item that
/// does, in popularity order, so the baseline never ranks by accident.
pub struct ItemKnn {
    /// Per catalog row, the dense indices of its training users.
    users_of: Vec<Vec<u32>>,
    /// `1 / √n_i`, 0 for items no training user has.
    inv_sqrt_n: Vec<f32>,
    users: usize,
    /// `[N, U]` sparse: `X[u, j] / √n_j`, transposed.
    item_user: Tensor,
    /// Popularity in `[0, 1)`: the fallback order of items without co-occurrence.
    fallback: Tensor,
}

impl ItemKnn {
    /// Fits on the training targets; `popularity` (from [`popularity_scores`], one per catalog
    /// row, on the device to score on) orders the items without co-occurrence.
    pub fn fit(train: &ExampleSet, popularity: &Tensor) -> ItemKnn {
        let catalog_len = popularity.size()[0] as usize;
        let device = popularity.device();
        let (users_of, users) = training_buyers(train, catalog_len);
        let inv_sqrt_n: Vec<f32> = users_of
            .iter()
            .map(|u| {
                if u.is_empty() {
                    0.0
                } else {
                    1.0 / (u.len() as f32).sqrt()
                }
            })
            .collect();
        let (mut rows, mut cols, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for (item, users) in users_of.iter().enumerate() {
            for &u in users {
                rows.push(item as i64);
                cols.push(u as i64);
                values.push(inv_sqrt_n[item]);
            }
        }
        let users = users.max(1);
        let nnz = rows.len() as i64;
        let indices =
            Tensor::cat(&[Tensor::from_slice(&rows), Tensor::from_slice(&cols)], 0).view([2, nnz]);
        let item_user = Tensor::sparse_coo_tensor_indices_size(
            &indices,
            &Tensor::from_slice(&values),
            [catalog_len as i64, users as i64],
            (Kind::Float, Device::Cpu),
            true,
        )
        .to_device(device);
        let n = catalog_len.max(1) as f64;
        // Positions 0, -1, -2, ... → (N - 1 - position) / N in [0, 1).
        let fallback = (popularity + (n - 1.0)) / n;
        ItemKnn {
            users_of,
            inv_sqrt_n,
            users,
            item_user,
            fallback,
        }
    }

    /// `[B, N]` scores of a batch of examples from their histories' items.
    pub fn scores(&self, chunk: &[&EncodedExample]) -> Tensor {
        let b = chunk.len();
        let mut weights = vec![0f32; b * self.users];
        for (r, ex) in chunk.iter().enumerate() {
            let row = &mut weights[r * self.users..(r + 1) * self.users];
            let mut items: Vec<u32> = ex
                .history
                .iter()
                .map(|h| h.item_row)
                .filter(|&i| i != NONE)
                .collect();
            items.sort_unstable();
            items.dedup();
            for i in items {
                let w = self.inv_sqrt_n[i as usize];
                for &u in &self.users_of[i as usize] {
                    row[u as usize] += w;
                }
            }
        }
        let device = self.item_user.device();
        let w = Tensor::from_slice(&weights)
            .view([b as i64, self.users as i64])
            .to_device(device);
        // [N, U] × [U, B] → [N, B].
        let knn = self.item_user.mm(&w.tr()).tr();
        // Co-occurring items above all others (1 + s > 1 > fallback), others by popularity.
        let has = knn.gt(0.0);
        (knn + 1.0).where_self(&has, &self.fallback.unsqueeze(0).expand_as(&has))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use towers::dataset::EncodedEvent;

    fn example(user_id: u64, target_row: u32, ts_ms: i64, history: &[u32]) -> EncodedExample {
        EncodedExample {
            user_id,
            ts_ms,
            target_row,
            history: history
                .iter()
                .map(|&item_row| EncodedEvent {
                    event_type: 1,
                    item_row,
                    query: NONE,
                    gap_s: 1,
                })
                .collect(),
            hour: 0,
            weekday: 0,
            user_features: Vec::new(),
        }
    }

    fn set(examples: Vec<EncodedExample>) -> ExampleSet {
        ExampleSet {
            examples,
            queries: Vec::new(),
        }
    }

    #[test]
    fn recent_popularity_orders_by_recent_sales_then_all_time() {
        let day = 86_400_000;
        // First purchases: item 0 three times, item 2 twice, item 1 once; item 3 never.
        let train = set(vec![
            example(1, 0, 0, &[]),
            example(2, 0, 0, &[]),
            example(3, 0, 0, &[]),
            example(1, 2, day, &[]),
            example(2, 2, day, &[]),
            example(1, 1, 100 * day, &[]),
        ]);
        let counts = target_counts(&train, 4);
        let all = Vec::<f32>::try_from(popularity_scores(&counts, Device::Cpu)).unwrap();
        assert_eq!(all, [0.0, -2.0, -1.0, -3.0]);
        // Lately item 1 sold twice (repeats count) and item 3 once.
        let recent = [0, 2, 0, 1];
        let scores = recent_popularity_scores(&recent, &counts, Device::Cpu);
        assert_eq!(
            Vec::<f32>::try_from(scores).unwrap(),
            [-2.0, 0.0, -3.0, -1.0]
        );
    }

    #[test]
    fn interaction_counts_take_every_item_event_in_the_window() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.parquet");
        let ev = |user_id, ts_ms, item_id: Option<u64>| Event {
            user_id,
            ts_ms,
            event_type: match item_id {
                Some(_) => features::EventType::Purchase,
                None => features::EventType::Search,
            },
            item_id,
            query: item_id.is_none().then(|| "milk".to_string()),
            value: None,
        };
        let events = [
            ev(1, 5, Some(10)),
            ev(1, 6, Some(10)),
            ev(2, 7, Some(20)),
            ev(2, 7, None),
            ev(2, 9, Some(20)),
            ev(3, 4, Some(20)),
            ev(3, 8, Some(99)),
        ];
        features::write_table(&path, &events).unwrap();
        let catalog = crate::cooccurrence::tests::bare_catalog(vec![10, 20]);
        assert_eq!(interaction_counts(&path, &catalog, 5, 9).unwrap(), [2, 1]);
    }

    /// Users 1 and 2 bought items 0 and 1; user 3 bought items 1 and 2; item 3 sold once alone.
    fn co_bought() -> ExampleSet {
        set(vec![
            example(1, 0, 0, &[]),
            example(1, 1, 0, &[]),
            example(2, 0, 0, &[]),
            example(2, 1, 0, &[]),
            example(3, 1, 0, &[]),
            example(3, 2, 0, &[]),
            example(4, 3, 0, &[]),
        ])
    }

    #[test]
    fn item_knn_is_the_summed_cosine_of_co_occurrence() {
        let train = co_bought();
        let popularity = popularity_scores(&target_counts(&train, 5), Device::Cpu);
        let knn = ItemKnn::fit(&train, &popularity);
        let query = example(9, 4, 0, &[0, NONE, 0]);
        let s = Vec::<f32>::try_from(knn.scores(&[&query]).squeeze_dim(0)).unwrap();
        // cos(0,0) = 1; cos(0,1) = 2/√(2·3); cos(0,2) = 0; cos(0,3) = 0.
        assert!((s[0] - 2.0).abs() < 1e-6, "{s:?}");
        assert!((s[1] - (1.0 + 2.0 / 6f32.sqrt())).abs() < 1e-6, "{s:?}");
        // No co-occurrence: below every co-occurring item, in popularity order (1 > 0 = 2 = 3 > 4
        // by count, ties by row): item 2 before item 3 before item 4.
        assert!(s[2] < 1.0 && s[3] < s[2] && s[4] < s[3], "{s:?}");
        // An empty history falls back to popularity alone.
        let empty = example(9, 4, 0, &[]);
        let e = Vec::<f32>::try_from(knn.scores(&[&empty]).squeeze_dim(0)).unwrap();
        assert!(
            e[1] > e[0] && e[0] > e[2] && e.iter().all(|&v| v < 1.0),
            "{e:?}"
        );
    }

    #[test]
    fn the_second_stage_scores_co_occurrence_exactly_as_the_item_knn_baseline() {
        let train = co_bought();
        let ids = vec![100, 200, 300, 400, 500];
        let catalog = crate::cooccurrence::tests::bare_catalog(ids.clone());
        let popularity = popularity_scores(&target_counts(&train, 5), Device::Cpu);
        let knn = ItemKnn::fit(&train, &popularity);
        let cobuyers = crate::rerank::fit_cobuyers(&train, &catalog);
        let query = example(9, 4, 0, &[0, NONE, 1, 0]);
        let s = Vec::<f32>::try_from(knn.scores(&[&query]).squeeze_dim(0)).unwrap();
        let co = cobuyers.scores(&[100, 200, 100], &ids);
        for (row, (&s, &c)) in s.iter().zip(&co).enumerate() {
            let raw = if s >= 1.0 { s - 1.0 } else { 0.0 };
            assert!(
                (raw - c).abs() < 1e-6,
                "row {row}: item-kNN {raw}, second stage {c}"
            );
        }
    }
}
