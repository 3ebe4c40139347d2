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
use towers::{ItemBatchHost, TowerConfig, UserBatchHost};

use towers::dataset::{Catalog, ExampleSet};

/// One batch on the host: item content, user inputs and the candidate layout.
pub struct HostBatch {
    pub items: ItemBatchHost,
    pub users: UserBatchHost,
    /// Row (in `items`) of each candidate: first the B targets, then the extra negatives.
    pub candidates: Vec<i64>,
    /// Catalog row of each candidate, to find accidental hits.
    pub candidate_catalog_rows: Vec<i64>,
    /// Log of each candidate's expected count in the candidate set (logQ correction).
    pub candidate_log_q: Vec<f32>,
    /// Number of examples (B).
    pub size: usize,
}

/// How often each item is a training target: the sampling distribution of in-batch negatives.
pub struct TargetFrequency {
    log_p: Vec<f32>,
}

impl TargetFrequency {
    pub fn new(train: &ExampleSet, catalog_len: usize) -> Self {
        let counts = crate::baselines::target_counts(train, catalog_len);
        let total = train.examples.len().max(1) as f64;
        // Items never a target cannot be in-batch candidates; give them the smallest observed
        // probability so the value is finite.
        let log_p = counts
            .iter()
            .map(|&c| ((c.max(1) as f64) / total).ln() as f32)
            .collect();
        TargetFrequency { log_p }
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
    pub logq: bool,
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
            // Expected count of this item among B in-batch candidates: B * p(item).
            candidate_log_q.push(if self.logq {
                self.freq.log_p[ex.target_row as usize] + (b as f32).ln()
            } else {
                0.0
            });
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
            // Uniform sampling: each item's expected count is N / |pool|.
            candidate_log_q.push(if self.logq {
                (self.extra_negatives as f32 / pool.len() as f32).ln()
            } else {
                0.0
            });
        }
        let tokens: Vec<_> = rows
            .iter()
            .map(|&r| &self.catalog.tokens[r as usize])
            .collect();
        HostBatch {
            items: ItemBatchHost::new(&tokens, &self.tower),
            users: UserBatchHost::new(&users, &self.tower),
            candidates,
            candidate_catalog_rows,
            candidate_log_q,
            size: b,
        }
    }
}
