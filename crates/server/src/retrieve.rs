//! Top-k retrieval with exact filters.
//!
//! FAISS has no notion of our filters, so the search over-fetches: it asks for `k` plus the
//! number of explicitly excluded items, and doubles the request until `k` items pass. When the
//! request would grow past `max_overfetch`, or the approximate search runs out of candidates
//! (an IVF search only sees its probed lists) while the catalog still has more, it switches to an
//! exact scan of every embedding. Either way, fewer than `k` items come back only when fewer
//! than `k` items in the whole catalog pass the filter.

use indexer::{IndexVersion, Probes};

use crate::catalog::ItemCatalog;
use crate::error::Result;
use crate::filter::RowFilter;

/// One retrieved item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub row: u32,
    pub id: u64,
    pub score: f32,
}

/// The second stage over retrieved candidates (`found`, best first): each score gains the
/// re-ranker's co-occurrence term against the history's item ids, and the best `k` are kept,
/// best first (ties by ascending id). The scores returned are the re-scored ones.
pub fn rerank(
    reranker: &towers::Reranker,
    history: &[u64],
    mut found: Vec<Scored>,
    k: usize,
) -> Vec<Scored> {
    let ids: Vec<u64> = found.iter().map(|s| s.id).collect();
    let mut scores: Vec<f32> = found.iter().map(|s| s.score).collect();
    reranker.rescore(history, &ids, &mut scores);
    for (s, score) in found.iter_mut().zip(scores) {
        s.score = score;
    }
    found.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
    found.truncate(k);
    found
}

/// Settings of one search.
#[derive(Debug, Clone, Copy)]
pub struct SearchParams {
    pub k: usize,
    pub nprobe: Option<usize>,
    pub max_overfetch: usize,
}

/// The `k` best items for `query` that pass `filter`, best first (ties by ascending id).
/// `probes`: the lists the query probes at the default nprobe, when its micro-batch found them
/// together (`indexer::VectorIndex::probes`).
pub fn top_k(
    version: &IndexVersion,
    catalog: &ItemCatalog,
    query: &[f32],
    probes: Option<&Probes>,
    filter: &RowFilter,
    p: SearchParams,
) -> Result<Vec<Scored>> {
    let n = version.embeddings.len();
    if p.k == 0 || n == 0 {
        return Ok(Vec::new());
    }
    let searcher = version.searcher();
    let mut fetch = (p.k + filter.excluded_ids()).min(n);
    loop {
        let kept = p.k.min(fetch);
        if searcher.candidates(kept, fetch - kept) > p.max_overfetch {
            return Ok(exact(version, catalog, query, filter, p.k));
        }
        let hits =
            searcher.search_probed_with_slack(query, kept, fetch - kept, p.nprobe, probes)?;
        let mut got = Vec::with_capacity(p.k);
        let mut returned = 0usize;
        for (id, score) in hits.of(0) {
            returned += 1;
            let Some(&row) = version.row_of.get(&id) else {
                continue;
            };
            if filter.passes(id, row, catalog) {
                got.push(Scored { row, id, score });
                if got.len() == p.k {
                    break;
                }
            }
        }
        if got.len() == p.k || returned == n {
            // Enough, or every item was a candidate: nothing else could pass.
            got.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
            return Ok(got);
        }
        if returned < fetch || fetch == n {
            // The approximate search has no more candidates, but the catalog may.
            return Ok(exact(version, catalog, query, filter, p.k));
        }
        fetch = (fetch * 2).min(n);
    }
}

/// Exact top-k over every embedding that passes the filter.
pub fn exact(
    version: &IndexVersion,
    catalog: &ItemCatalog,
    query: &[f32],
    filter: &RowFilter,
    k: usize,
) -> Vec<Scored> {
    let e = &version.embeddings;
    let dot = indexer::rerank::dot;
    let mut all: Vec<Scored> = (0..e.len())
        .filter_map(|r| {
            let (row, id) = (r as u32, e.ids[r]);
            filter.passes(id, row, catalog).then(|| Scored {
                row,
                id,
                score: dot(query, e.vector(r)),
            })
        })
        .collect();
    let order = |a: &Scored, b: &Scored| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id));
    if all.len() > k {
        all.select_nth_unstable_by(k - 1, order);
        all.truncate(k);
    }
    all.sort_by(order);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use towers::{CoBuyers, Reranker};

    #[test]
    fn the_second_stage_reorders_candidates_by_co_occurrence_and_keeps_k() {
        // Item 3 was bought with the history's item 1 by both of its buyers; 2 by nobody.
        let reranker = Reranker {
            weight: 1.0,
            depth: 3,
            cobuyers: CoBuyers::new(vec![(1, vec![0, 1]), (2, vec![2]), (3, vec![0, 1])]),
        };
        let found = vec![
            Scored {
                row: 0,
                id: 2,
                score: 0.9,
            },
            Scored {
                row: 1,
                id: 3,
                score: 0.5,
            },
            Scored {
                row: 2,
                id: 4,
                score: 0.4,
            },
        ];
        let got = rerank(&reranker, &[1, 1], found.clone(), 2);
        assert_eq!(got.iter().map(|s| s.id).collect::<Vec<_>>(), [3, 2]);
        assert!((got[0].score - (0.5 + 2f32.ln())).abs() < 1e-6);
        // Without history the towers' order stands.
        let alone = rerank(&reranker, &[], found, 3);
        assert_eq!(alone.iter().map(|s| s.id).collect::<Vec<_>>(), [2, 3, 4]);
    }
}
