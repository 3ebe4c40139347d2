//! Exact re-ranking of approximate candidates.
//!
//! Compressed codes (`SQ8`, `PQ…x4fs`) make the inverted-list scan, most of a search's cost,
//! several times cheaper, but blur close scores. Fetching `factor · k` candidates and re-scoring
//! them with the exact item vectors recovers most of the recall for a few hundred dot products.
//! The vectors are at hand anyway: every index version keeps `embeddings.parquet`, and the
//! server holds it in memory for history items and exact fallbacks.

use std::collections::HashMap;

use features::Embeddings;

use crate::error::Result;
use crate::vector_index::{Hits, Probes, VectorIndex};

/// How one version searches: the FAISS index, then (with `factor > 1`) exact re-scoring.
#[derive(Clone, Copy)]
pub struct Searcher<'a> {
    pub index: &'a VectorIndex,
    pub embeddings: &'a Embeddings,
    /// Row of each item id in `embeddings`.
    pub row_of: &'a HashMap<u64, u32>,
    /// Candidates fetched per wanted result (1: the index's own order, no re-scoring).
    pub factor: usize,
}

impl Searcher<'_> {
    /// The `k` best items for each query, best first (ties by ascending id), like
    /// [`VectorIndex::search`].
    pub fn search(&self, queries: &[f32], k: usize, nprobe: Option<usize>) -> Result<Hits> {
        self.search_with_slack(queries, k, 0, nprobe)
    }

    /// How many candidates [`Searcher::search_with_slack`] asks the index for.
    pub fn candidates(&self, k: usize, slack: usize) -> usize {
        k.saturating_mul(self.factor.max(1)).saturating_add(slack)
    }

    /// The best `k + slack` items, for callers that will drop up to `slack` of them (filters):
    /// `factor·k + slack` candidates are re-scored, not `factor·(k + slack)`, because the
    /// re-ranking needs its margin only around the `k` that will be kept.
    pub fn search_with_slack(
        &self,
        queries: &[f32],
        k: usize,
        slack: usize,
        nprobe: Option<usize>,
    ) -> Result<Hits> {
        self.search_probed_with_slack(queries, k, slack, nprobe, None)
    }

    /// [`Searcher::search_with_slack`] for one query whose probed lists were found beforehand,
    /// with a batch of queries ([`VectorIndex::probes`]). They are the default nprobe's, so a
    /// search with another `nprobe` finds its own.
    pub fn search_probed_with_slack(
        &self,
        queries: &[f32],
        k: usize,
        slack: usize,
        nprobe: Option<usize>,
        probes: Option<&Probes>,
    ) -> Result<Hits> {
        let default = nprobe.is_none() || nprobe == self.index.default_nprobe();
        let fetch = |k: usize| match probes.filter(|_| default) {
            Some(probes) => self.index.search_probed(queries, k, probes),
            None => self.index.search(queries, k, nprobe),
        };
        let want = k.saturating_add(slack);
        if self.factor <= 1 || want == 0 {
            return fetch(want);
        }
        let fetch_n = self.candidates(k, slack).min(self.index.len().max(want));
        let candidates = fetch(fetch_n)?;
        let dim = self.embeddings.dim;
        let n = queries.len() / dim;
        let mut out = Hits {
            k: want,
            ids: vec![-1; n * want],
            scores: vec![f32::NEG_INFINITY; n * want],
        };
        let mut scored: Vec<(f32, u64)> = Vec::with_capacity(fetch_n);
        for q in 0..n {
            let query = &queries[q * dim..(q + 1) * dim];
            scored.clear();
            scored.extend(candidates.of(q).filter_map(|(id, _)| {
                let &row = self.row_of.get(&id)?;
                Some((dot(query, self.embeddings.vector(row as usize)), id))
            }));
            let order = |a: &(f32, u64), b: &(f32, u64)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            if scored.len() > want {
                scored.select_nth_unstable_by(want - 1, order);
                scored.truncate(want);
            }
            scored.sort_unstable_by(order);
            for (i, &(score, id)) in scored.iter().enumerate() {
                out.ids[q * want + i] = id as i64;
                out.scores[q * want + i] = score;
            }
        }
        Ok(out)
    }
}

/// The dot product the exact re-ranking uses (shared with the user tower's CPU recurrence).
pub use towers::dot::dot;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reranking_restores_the_exact_order_of_the_candidates() {
        let dim = 4;
        // Item 10 is closest to the query, then 30, then 20; 40 points away.
        let embeddings = Embeddings {
            dim,
            ids: vec![10, 20, 30, 40],
            vectors: vec![
                1.0, 0.0, 0.0, 0.0, //
                0.6, 0.8, 0.0, 0.0, //
                0.8, 0.6, 0.0, 0.0, //
                -1.0, 0.0, 0.0, 0.0,
            ],
        };
        let row_of = embeddings.row_of().unwrap();
        let mut index = VectorIndex::new("Flat", dim).unwrap();
        index.add(&embeddings.ids, &embeddings.vectors).unwrap();
        let query = [1.0, 0.0, 0.0, 0.0];
        for factor in [1, 2, 10] {
            let s = Searcher {
                index: &index,
                embeddings: &embeddings,
                row_of: &row_of,
                factor,
            };
            let hits = s.search(&query, 2, None).unwrap();
            let ids: Vec<u64> = hits.of(0).map(|(id, _)| id).collect();
            assert_eq!(ids, [10, 30], "factor {factor}");
            let all: Vec<u64> = s
                .search(&query, 9, None)
                .unwrap()
                .of(0)
                .map(|h| h.0)
                .collect();
            assert_eq!(
                all,
                [10, 30, 20, 40],
                "factor {factor}: every item, nothing invented"
            );
        }
    }

    #[test]
    fn probes_found_beforehand_serve_the_default_nprobe_and_only_it() {
        use crate::vector_index::tests::{assert_same_hits, unit_vectors};
        let (n, dim) = (2000, 8);
        let vectors = unit_vectors(n, dim, 17);
        let embeddings = Embeddings {
            dim,
            ids: (0..n as u64).map(|i| 100 + i).collect(),
            vectors,
        };
        let row_of = embeddings.row_of().unwrap();
        let mut index = VectorIndex::new("IVF16,SQ8", dim).unwrap();
        index.train(&embeddings.vectors).unwrap();
        index.add(&embeddings.ids, &embeddings.vectors).unwrap();
        index.set_default_nprobe(3).unwrap();
        let queries = &embeddings.vectors[..30 * dim];
        let probes = index.probes(queries).unwrap().unwrap();
        for factor in [1, 4] {
            let s = Searcher {
                index: &index,
                embeddings: &embeddings,
                row_of: &row_of,
                factor,
            };
            for (q, p) in queries.chunks(dim).zip(&probes) {
                for nprobe in [None, Some(3), Some(9)] {
                    assert_same_hits(
                        &s.search_probed_with_slack(q, 5, 4, nprobe, Some(p))
                            .unwrap(),
                        &s.search_with_slack(q, 5, 4, nprobe).unwrap(),
                    );
                }
            }
        }
    }
}
