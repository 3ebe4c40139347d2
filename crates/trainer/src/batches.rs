//! Training batches, built on a background thread while the previous batch trains.
//!
//! A batch holds each distinct item once — targets, history items and sampled negatives — so
//! the item tower runs once per distinct item rather than once per history slot; the user tower
//! then gathers the vectors it needs by row.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use towers::{ItemBatchHost, TowerConfig, UserBatchHost, UserInput};

use towers::dataset::{Catalog, ExampleSet, SeenItems};

/// One batch on the host: item content, user inputs in parts, and the candidate layout.
pub struct HostBatch {
    /// Each distinct item of the batch once (targets, history items and sampled negatives), so
    /// the item tower runs once per distinct item; the user tower gathers the vectors it needs.
    pub items: ItemBatchHost,
    /// The batch's rows in contiguous parts: one on CUDA, `cpu_batch_parts` on the CPU, whose
    /// user towers run on parallel threads (`crate::parts`).
    pub parts: Vec<UserPart>,
    /// Row (in `items`) of each candidate: first the B targets, then the extra negatives.
    pub candidates: Vec<i64>,
    /// Catalog row of each candidate, to find accidental hits.
    pub candidate_catalog_rows: Vec<i64>,
    /// Log of each candidate's expected count in the candidate set (logQ correction).
    pub candidate_log_q: Vec<f32>,
    /// `row · C + column` of every candidate that row's user interacted with before its target
    /// (empty unless seen negatives are removed), ascending.
    pub seen_candidates: Vec<i64>,
    /// Number of examples (B).
    pub size: usize,
}

/// A contiguous run of a batch's rows, as the user tower takes them.
pub struct UserPart {
    /// The part's users; their history events point at rows of `item_rows`, or of the batch's
    /// items when `item_rows` is `None`.
    pub users: UserBatchHost,
    /// The rows (in the batch's items) of the items this part's histories point at, each once:
    /// a part gathers only its own from the batch's item vectors. `None` for a batch in one
    /// part, whose histories point at the batch's items directly.
    pub item_rows: Option<Vec<i64>>,
    /// Number of the part's rows.
    pub rows: usize,
}

impl HostBatch {
    /// History events over all the batch's rows.
    pub fn history_events(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.users.history_events() as usize)
            .sum()
    }
}

/// Part `k` of `n` items split into `parts` contiguous runs whose sizes differ by at most one.
pub fn part_range(n: usize, parts: usize, k: usize) -> std::ops::Range<usize> {
    n * k / parts..n * (k + 1) / parts
}

/// How often each item is a training target: the sampling distribution of in-batch negatives.
pub struct TargetFrequency {
    /// Training-target share of each catalog row.
    p: Vec<f64>,
}

impl TargetFrequency {
    pub fn new(train: &ExampleSet, catalog_len: usize) -> Self {
        let counts = crate::baselines::target_counts(train, catalog_len);
        let total = train.examples.len().max(1) as f64;
        TargetFrequency {
            p: counts.iter().map(|&c| c as f64 / total).collect(),
        }
    }

    /// The training-target share of catalog row `row`.
    pub fn share(&self, row: usize) -> f64 {
        self.p[row]
    }
}

/// Everything the batch-building thread needs, shared read-only.
pub struct BatchSource {
    pub train: Arc<ExampleSet>,
    pub catalog: Arc<Catalog>,
    pub freq: Arc<TargetFrequency>,
    /// Catalog rows extra negatives are drawn from: every item but held-out cold ones.
    pub negative_pool: Arc<Vec<u32>>,
    pub tower: TowerConfig,
    pub batch_size: usize,
    pub extra_negatives: usize,
    /// Parts each batch is split into (at most one per row); see [`HostBatch`].
    pub parts: usize,
    pub logq: bool,
    /// Count both samplers in every candidate's logQ (`BatchSource::log_q`).
    pub logq_mixture: bool,
    /// Each user's earlier items, when they are not to be negatives (`remove_seen_negatives`).
    pub seen: Option<Arc<SeenItems>>,
}

impl BatchSource {
    /// Batches in one epoch: a last batch of one example is dropped (a softmax over one
    /// candidate teaches nothing).
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.train.len();
        (n / self.batch_size + usize::from(n % self.batch_size >= 2)).max(1)
    }

    /// Batches of one epoch in a seeded random order, produced on a background thread with a
    /// small queue (prefetch). The last batch is dropped if it has fewer than 2 examples.
    pub fn epoch(self: &Arc<Self>, seed: u64, epoch: usize) -> (Receiver<HostBatch>, usize) {
        let mut order: Vec<u32> = (0..self.train.len() as u32).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        order.shuffle(&mut rng);
        let chunks: Vec<Vec<u32>> = order
            .chunks(self.batch_size)
            .filter(|c| c.len() >= 2)
            .map(|c| c.to_vec())
            .collect();
        let n = chunks.len();
        let (tx, rx) = sync_channel(4);
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            for chunk in chunks {
                if tx.send(me.build(&chunk, &mut rng)).is_err() {
                    return; // the trainer stopped early
                }
            }
        });
        (rx, n)
    }

    /// The logQ correction of a candidate in a batch of `b` targets (0 without correction):
    /// the log of its expected count among the batch's candidates.
    ///
    /// With `logq_mixture`, both samplers count for every candidate, wherever it was drawn
    /// from: `B·p + E/|pool|`. A popular item drawn as a uniform negative is still mostly an
    /// in-batch candidate, and a long-tail target still turns up among the uniform draws.
    /// Without it, each candidate counts only the sampler that drew it (`B·p` for targets,
    /// `E/|pool|` for extra negatives), which overstates the rarity of both: a long-tail target
    /// (fewer than about `E·T / (B·|pool|)` training purchases) and every popular item drawn as
    /// an extra negative get their logits raised by several nats too many. Every candidate is
    /// in the pool (training targets are never held-out cold items), so the uniform term
    /// applies to all.
    fn log_q(&self, row: u32, b: usize, drawn_in_batch: bool) -> f32 {
        if !self.logq {
            return 0.0;
        }
        let in_batch = b as f64 * self.freq.share(row as usize);
        let pool = self.negative_pool.len();
        let uniform = if pool == 0 {
            0.0
        } else {
            self.extra_negatives as f64 / pool as f64
        };
        let expected = match (self.logq_mixture, drawn_in_batch) {
            (true, _) => in_batch + uniform,
            (false, true) => in_batch,
            (false, false) => uniform,
        };
        // An item no sampler can draw is never a candidate; keep the value finite regardless.
        expected.max(f64::MIN_POSITIVE).ln() as f32
    }

    fn build(&self, examples: &[u32], rng: &mut ChaCha8Rng) -> HostBatch {
        let mut local: HashMap<u32, i64> = HashMap::new();
        let mut rows: Vec<u32> = Vec::new();
        let mut row_of = |r: u32, rows: &mut Vec<u32>| -> i64 {
            *local.entry(r).or_insert_with(|| {
                rows.push(r);
                rows.len() as i64 - 1
            })
        };
        let b = examples.len();
        let mut candidates = Vec::with_capacity(b + self.extra_negatives);
        let mut candidate_catalog_rows = Vec::with_capacity(b + self.extra_negatives);
        let mut candidate_log_q = Vec::with_capacity(b + self.extra_negatives);
        let mut users = Vec::with_capacity(b);
        for &i in examples {
            let ex = &self.train.examples[i as usize];
            candidates.push(row_of(ex.target_row, &mut rows));
            candidate_catalog_rows.push(ex.target_row as i64);
            candidate_log_q.push(self.log_q(ex.target_row, b, true));
            users.push(self.train.user_input(ex, |r| row_of(r, &mut rows)));
        }
        let pool = &self.negative_pool;
        for _ in 0..self.extra_negatives {
            if pool.is_empty() {
                break;
            }
            let r = pool[rng.random_range(0..pool.len())];
            candidates.push(row_of(r, &mut rows));
            candidate_catalog_rows.push(r as i64);
            candidate_log_q.push(self.log_q(r, b, false));
        }
        let seen_candidates = self.seen_candidates(examples, &candidate_catalog_rows);
        let tokens: Vec<_> = rows
            .iter()
            .map(|&r| &self.catalog.tokens[r as usize])
            .collect();
        let n_parts = self.parts.clamp(1, b);
        let parts = if n_parts == 1 {
            vec![UserPart {
                users: UserBatchHost::new(&users, &self.tower),
                item_rows: None,
                rows: b,
            }]
        } else {
            (0..n_parts)
                .map(|k| self.user_part(&mut users[part_range(b, n_parts, k)]))
                .collect()
        };
        HostBatch {
            items: ItemBatchHost::new(&tokens, &self.tower),
            parts,
            candidates,
            candidate_catalog_rows,
            candidate_log_q,
            seen_candidates,
            size: b,
        }
    }

    /// A part of `users`, whose events point at the batch's items: each event is pointed at
    /// the part's own table of those items instead.
    fn user_part(&self, users: &mut [UserInput]) -> UserPart {
        let mut local: HashMap<i64, i64> = HashMap::new();
        let mut item_rows = Vec::new();
        for event in users.iter_mut().flat_map(|u| u.history.iter_mut()) {
            if let Some(row) = &mut event.item_row {
                *row = *local.entry(*row).or_insert_with(|| {
                    item_rows.push(*row);
                    item_rows.len() as i64 - 1
                });
            }
        }
        UserPart {
            users: UserBatchHost::new(users, &self.tower),
            item_rows: Some(item_rows),
            rows: users.len(),
        }
    }

    /// `row · C + column` of each candidate that row `row`'s user interacted with before the
    /// target, the same items evaluation masks (`SeenItems::before`). A row's own positive is
    /// never among them: a target is the user's first interaction with its item.
    fn seen_candidates(&self, examples: &[u32], candidate_catalog_rows: &[i64]) -> Vec<i64> {
        let Some(seen) = &self.seen else {
            return Vec::new();
        };
        let c = candidate_catalog_rows.len();
        let mut columns: HashMap<u32, Vec<usize>> = HashMap::new();
        for (col, &r) in candidate_catalog_rows.iter().enumerate() {
            columns.entry(r as u32).or_default().push(col);
        }
        let mut flat = Vec::new();
        for (row, &i) in examples.iter().enumerate() {
            let ex = &self.train.examples[i as usize];
            let target = self.catalog.ids[ex.target_row as usize];
            for item in seen.before(ex.user_id, target) {
                for &col in columns.get(&item).map(Vec::as_slice).unwrap_or(&[]) {
                    if col != row {
                        flat.push((row * c + col) as i64);
                    }
                }
            }
        }
        // Repeat purchases list an item many times.
        flat.sort_unstable();
        flat.dedup();
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use features::ItemTokens;

    /// A source over `items` catalog rows whose training targets are `targets`, drawing `extra`
    /// uniform negatives from every row.
    fn source(items: u32, targets: &[u32], extra: usize, mixture: bool) -> BatchSource {
        let catalog = Catalog {
            ids: (0..items as u64).collect(),
            tokens: (0..items).map(|_| ItemTokens::default()).collect(),
            row_of: (0..items as u64).map(|i| (i, i as u32)).collect(),
        };
        let pairs: Vec<(u64, u32)> = targets
            .iter()
            .enumerate()
            .map(|(u, &t)| (u as u64, t))
            .collect();
        let train = crate::cooccurrence::tests::bought(&pairs);
        BatchSource {
            freq: Arc::new(TargetFrequency::new(&train, items as usize)),
            train: Arc::new(train),
            catalog: Arc::new(catalog),
            negative_pool: Arc::new((0..items).collect()),
            tower: TowerConfig::small(4),
            batch_size: targets.len(),
            extra_negatives: extra,
            parts: 1,
            logq: true,
            logq_mixture: mixture,
            seen: None,
        }
    }

    #[test]
    fn a_candidate_gets_one_log_q_whether_drawn_in_batch_or_uniformly() {
        // Item 0 is every other target; items 1..4 once each; items 4..8 never.
        let targets = [0, 1, 0, 2, 0, 3, 0, 0];
        let src = source(8, &targets, 64, true);
        let examples: Vec<u32> = (0..targets.len() as u32).collect();
        let batch = src.build(&examples, &mut ChaCha8Rng::seed_from_u64(7));
        let (b, extra, pool) = (8.0f64, 64.0, 8.0);
        let mut seen_as_negative = [false; 8];
        for (c, (&row, &log_q)) in batch
            .candidate_catalog_rows
            .iter()
            .zip(&batch.candidate_log_q)
            .enumerate()
        {
            let p = targets.iter().filter(|&&t| t as i64 == row).count() as f64 / b;
            let expected = (b * p + extra / pool).ln() as f32;
            assert!(
                (log_q - expected).abs() < 1e-5,
                "candidate {c} (row {row}): {log_q}, expected {expected}"
            );
            if c >= targets.len() {
                seen_as_negative[row as usize] = true;
            }
        }
        // The draws covered popular, long-tail and never-bought items alike.
        assert!(seen_as_negative[0] && seen_as_negative[1] && seen_as_negative[5]);
    }

    #[test]
    fn history_items_are_not_negatives_for_their_own_user_when_seen_negatives_are_removed() {
        // User 0 bought items 5 and 6, then its target 0; user 1 bought 6 after its target 1,
        // so 6 is no earlier item of user 1's; user 2 has no events before its target 2.
        let tmp = tempfile::tempdir().unwrap();
        let events_path = tmp.path().join("events.parquet");
        let ev = |user_id, ts_ms, item| features::Event {
            user_id,
            ts_ms,
            event_type: features::EventType::Purchase,
            item_id: Some(item),
            query: None,
            value: None,
        };
        let events = [
            ev(0, 1, 5),
            ev(0, 2, 6),
            ev(0, 2, 5),
            ev(0, 3, 0),
            ev(1, 1, 1),
            ev(1, 2, 6),
            ev(2, 1, 2),
        ];
        features::write_table(&events_path, &events).unwrap();
        let mut src = source(8, &[0, 1, 2], 64, false);
        src.seen = Some(Arc::new(
            SeenItems::load(&events_path, &src.catalog).unwrap(),
        ));
        let batch = src.build(&[0, 1, 2], &mut ChaCha8Rng::seed_from_u64(5));
        let c = batch.candidate_catalog_rows.len();
        let expected: Vec<i64> = (0..c)
            .filter(|&col| matches!(batch.candidate_catalog_rows[col], 5 | 6))
            .map(|col| col as i64)
            .collect();
        assert!(expected.len() >= 2, "the draws cover items 5 and 6");
        assert_eq!(
            batch.seen_candidates, expected,
            "row 0's columns of 5 and 6 only"
        );
        // Without the setting nothing is masked.
        src.seen = None;
        let batch = src.build(&[0, 1, 2], &mut ChaCha8Rng::seed_from_u64(5));
        assert!(batch.seen_candidates.is_empty());
    }

    #[test]
    fn a_batch_in_parts_points_each_part_at_its_own_items() {
        let targets = [0, 1, 0, 2, 0, 3, 4];
        let mut src = source(8, &targets, 5, false);
        // Histories: example i saw items i + 1 and 7 (shared by every part), the last one a
        // search besides.
        let mut train = crate::cooccurrence::tests::bought(
            &targets
                .iter()
                .enumerate()
                .map(|(u, &t)| (u as u64, t))
                .collect::<Vec<_>>(),
        );
        let n = train.examples.len();
        for (i, ex) in train.examples.iter_mut().enumerate() {
            let event = |item_row| towers::dataset::EncodedEvent {
                event_type: 1,
                item_row,
                query: towers::dataset::NONE,
                gap_s: 5,
            };
            ex.history = vec![event(i as u32 + 1), event(7)];
            if i + 1 == n {
                ex.history.push(event(towers::dataset::NONE));
            }
        }
        src.train = Arc::new(train);
        let examples: Vec<u32> = (0..targets.len() as u32).collect();
        let whole = src.build(&examples, &mut ChaCha8Rng::seed_from_u64(4));
        src.parts = 3;
        let split = src.build(&examples, &mut ChaCha8Rng::seed_from_u64(4));
        assert_eq!(whole.parts.len(), 1);
        assert!(whole.parts[0].item_rows.is_none());
        assert_eq!(split.parts.len(), 3);
        // The same items, draws and candidates, whatever the split.
        assert_eq!(split.items.len(), whole.items.len());
        assert_eq!(split.candidates, whole.candidates);
        assert_eq!(split.candidate_catalog_rows, whole.candidate_catalog_rows);
        assert_eq!(split.candidate_log_q, whole.candidate_log_q);
        assert_eq!(
            split.parts.iter().map(|p| p.rows).collect::<Vec<_>>(),
            [2, 2, 3]
        );
        // Each part's events point, through its table, at the batch items the whole batch's do.
        let whole_users = whole.parts[0].users.to_device(tch::Device::Cpu);
        let mut row = 0;
        for part in &split.parts {
            let table = tch::Tensor::from_slice(part.item_rows.as_ref().unwrap());
            let users = part.users.to_device(tch::Device::Cpu);
            let len = users.hist_item.size()[1];
            let got = table
                .index_select(0, &users.hist_item.flatten(0, -1))
                .view([-1, len]);
            let want = whole_users
                .hist_item
                .narrow(0, row, part.rows as i64)
                .narrow(1, 0, len);
            let real = users.hist_is_item.view([-1, len]).to_kind(tch::Kind::Int64);
            let (got, want) = (got * &real, want * &real);
            assert!(got.equal(&want), "{got} vs {want}");
            row += part.rows as i64;
        }
        // More parts than rows: one part per row.
        src.parts = 50;
        let tiny = src.build(&[0, 1], &mut ChaCha8Rng::seed_from_u64(4));
        assert_eq!(tiny.parts.len(), 2);
    }

    #[test]
    fn without_extra_negatives_log_q_is_the_in_batch_count() {
        for mixture in [false, true] {
            let src = source(4, &[0, 0, 0, 1], 0, mixture);
            let batch = src.build(&[0, 1, 2, 3], &mut ChaCha8Rng::seed_from_u64(1));
            let expected = [3.0f32.ln(), 3.0f32.ln(), 3.0f32.ln(), 0.0];
            for (got, want) in batch.candidate_log_q.iter().zip(expected) {
                assert!((got - want).abs() < 1e-6, "{got} vs {want}");
            }
        }
    }

    #[test]
    fn per_sampler_log_q_counts_only_the_sampler_that_drew_the_candidate() {
        let targets = [0, 1, 0, 0];
        let src = source(4, &targets, 8, false);
        let batch = src.build(&[0, 1, 2, 3], &mut ChaCha8Rng::seed_from_u64(3));
        for (c, (&row, &log_q)) in batch
            .candidate_catalog_rows
            .iter()
            .zip(&batch.candidate_log_q)
            .enumerate()
        {
            let expected = if c < targets.len() {
                let count = targets.iter().filter(|&&t| t as i64 == row).count();
                (count as f32).ln() // B·p = the count in the batch
            } else {
                2.0f32.ln() // E / |pool| = 8 / 4
            };
            assert!(
                (log_q - expected).abs() < 1e-6,
                "candidate {c}: {log_q} vs {expected}"
            );
        }
    }
}
