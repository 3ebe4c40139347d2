//! Top-k retrieval with exact filters.
//!
//! FAISS has no notion of our filters, so the search over-fetches: it asks for `k` plus the
//! number of explicitly excluded items, and doubles the request until `k` items pass. When the
//! request would grow past `max_overfetch`, or the approximate search runs out of candidates
//! (an IVF search only sees its probed lists) while the catalog still has more, it switches to an
//! exact scan of every embedding. Either way, fewer than `k` items come back only when fewer
//! than `k` items in the whole catalog pass the filter.

use indexer::IndexVersion;

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

/// Settings of one search.
#[derive(Debug, Clone, Copy)]
pub struct SearchParams {
    pub k: usize,
    pub nprobe: Option<usize>,
    pub max_overfetch: usize,
}

/// The `k` best items for `query` that pass `filter`, best first (ties by ascending id).
pub fn top_k(
    version: &IndexVersion,
    catalog: &ItemCatalog,
    query: &[f32],
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
        let hits = searcher.search_with_slack(query, kept, fetch - kept, p.nprobe)?;
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
