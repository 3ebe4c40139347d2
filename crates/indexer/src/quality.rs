//! How good the approximate index is: recall@10 and recall@100 against exact inner-product
//! search, on the queries the index will really answer (user vectors of validation examples),
//! and the smallest nprobe that reaches the recall target.

use std::collections::HashMap;
use std::path::Path;

use features::{Embeddings, Vocabularies};
use tch::{Device, Kind};
use towers::dataset::ExampleSet;
use towers::{GatheredItems, TwoTower, UserBatchHost};

use crate::error::Result;
use crate::manifest::NprobeRecall;
use crate::rerank::Searcher;
use crate::vector_index::{Hits, VectorIndex};

/// recall@100 the default nprobe must reach.
pub const RECALL_TARGET: f64 = 0.95;

/// Query vectors for measuring recall.
pub struct QuerySample {
    /// `users` or `items`.
    pub kind: &'static str,
    pub vectors: Vec<f32>,
    pub count: usize,
}

/// User vectors of up to `max` validation examples, evenly spaced through the file; `None` when
/// the file has no examples.
pub fn user_queries(
    model: &TwoTower,
    vocabs: &Vocabularies,
    examples: &Path,
    embeddings: &Embeddings,
    row_of: &HashMap<u64, u32>,
    max: usize,
) -> Result<Option<QuerySample>> {
    let cfg = &model.config;
    let set = ExampleSet::load(examples, row_of, vocabs, cfg.history_len)?;
    if set.is_empty() || max == 0 {
        return Ok(None);
    }
    let step = set.len().div_ceil(max);
    let chosen: Vec<_> = set.examples.iter().step_by(step).collect();
    let dim = embeddings.dim;
    let mut vectors = Vec::with_capacity(chosen.len() * dim);
    for chunk in chosen.chunks(256) {
        let mut gathered = GatheredItems::default();
        let users: Vec<_> = chunk
            .iter()
            .map(|ex| set.user_input(ex, |row| gathered.local_row(row, embeddings)))
            .collect();
        let item_vecs = gathered.to_tensor(dim, model.device())?;
        let inputs = UserBatchHost::new(&users, cfg).to_device(model.device());
        let out = tch::no_grad(|| model.encode_users(&inputs, &item_vecs, false))
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
            .view([-1]);
        vectors.extend(Vec::<f32>::try_from(&out)?);
    }
    Ok(Some(QuerySample {
        kind: "users",
        count: chosen.len(),
        vectors,
    }))
}

/// Up to `max` item vectors, evenly spaced: the queries when there are no examples.
pub fn item_queries(embeddings: &Embeddings, max: usize) -> QuerySample {
    let step = embeddings.len().div_ceil(max.max(1)).max(1);
    let mut vectors = Vec::new();
    let mut count = 0;
    for r in (0..embeddings.len()).step_by(step) {
        vectors.extend_from_slice(embeddings.vector(r));
        count += 1;
    }
    QuerySample {
        kind: "items",
        vectors,
        count,
    }
}

/// Exact top-k by brute force over every vector.
pub fn exact_hits(embeddings: &Embeddings, queries: &[f32], k: usize) -> Result<Hits> {
    let mut flat = VectorIndex::new("Flat", embeddings.dim)?;
    flat.add(&embeddings.ids, &embeddings.vectors)?;
    flat.search(queries, k, None)
}

/// Mean share of the exact top-`k` (first `k` of `exact`) that `approx` also returns in its
/// first `k`. Catalogs smaller than `k` count against their size.
pub fn recall_at(approx: &Hits, exact: &Hits, k: usize, queries: usize) -> f64 {
    if queries == 0 {
        return 1.0;
    }
    let mut total = 0.0;
    for q in 0..queries {
        let truth: Vec<u64> = exact.of(q).take(k).map(|(id, _)| id).collect();
        if truth.is_empty() {
            total += 1.0;
            continue;
        }
        let found: std::collections::HashSet<u64> =
            approx.of(q).take(k).map(|(id, _)| id).collect();
        total += truth.iter().filter(|id| found.contains(id)).count() as f64 / truth.len() as f64;
    }
    total / queries as f64
}

/// Measures recall (after `searcher`'s re-ranking) at increasing nprobe and returns every
/// measurement, by nprobe, and the chosen one: the smallest nprobe reaching [`RECALL_TARGET`]
/// at 100 ([`smallest_reaching`]), or `fixed` when given. Indexes without inverted lists are
/// measured once.
pub fn choose_nprobe(
    searcher: &Searcher<'_>,
    queries: &QuerySample,
    exact: &Hits,
    fixed: Option<usize>,
) -> Result<(NprobeRecall, Vec<NprobeRecall>)> {
    let k = exact.k;
    let index = searcher.index;
    let measure = |nprobe: Option<usize>| -> Result<NprobeRecall> {
        let hits = searcher.search(&queries.vectors, k, nprobe)?;
        // Re-ranking looks at factor·k candidates, so the top 10 of a k = 100 search saw more
        // than a k = 10 request will: measure recall@10 with a search of 10.
        let top10 = if searcher.factor > 1 {
            searcher.search(&queries.vectors, 10, nprobe)?
        } else {
            hits.clone()
        };
        Ok(NprobeRecall {
            nprobe: nprobe.unwrap_or(0),
            recall_at_10: recall_at(&top10, exact, 10, queries.count),
            recall_at_100: recall_at(&hits, exact, 100, queries.count),
        })
    };
    let Some(nlist) = index.nlist() else {
        let m = measure(None)?;
        return Ok((m.clone(), vec![m]));
    };
    if let Some(n) = fixed {
        let m = measure(Some(n.clamp(1, nlist)))?;
        return Ok((m.clone(), vec![m]));
    }
    let (chosen, tried) = smallest_reaching(nlist, |n| measure(Some(n)))?;
    if chosen.recall_at_100 < RECALL_TARGET {
        tracing::warn!(
            nprobe = chosen.nprobe,
            recall_at_100 = chosen.recall_at_100,
            "recall target not reached even probing every list"
        );
    }
    Ok((chosen, tried))
}

/// The smallest nprobe in `1..=nlist` whose recall@100 reaches [`RECALL_TARGET`] (`nlist`
/// where none does), with every measurement taken, by nprobe.
///
/// nprobe doubles (1, 2, 4, …) until the target is reached, then halves the gap to the last
/// one short of it until they are neighbours. Probing more lists only adds candidates, so
/// recall grows with nprobe, and the search takes about twice the doubling's measurements.
/// Each list probed is scanned by every query served, so the refinement is the serving cost:
/// on the 1M-item benchmark (`IVF4000,SQ8`) the doubling stopped at 64 where 36 reach it.
pub fn smallest_reaching(
    nlist: usize,
    mut measure: impl FnMut(usize) -> Result<NprobeRecall>,
) -> Result<(NprobeRecall, Vec<NprobeRecall>)> {
    let nlist = nlist.max(1);
    let mut tried: Vec<NprobeRecall> = Vec::new();
    let mut measure = |n: usize| -> Result<NprobeRecall> {
        let m = measure(n)?;
        tried.push(m.clone());
        Ok(m)
    };
    // `short`: the largest nprobe known to miss the target (0: none measured).
    let (mut short, mut nprobe) = (0, 1);
    let mut reached = loop {
        let m = measure(nprobe)?;
        if m.recall_at_100 >= RECALL_TARGET || nprobe >= nlist {
            break m;
        }
        short = nprobe;
        nprobe = (nprobe * 2).min(nlist);
    };
    if reached.recall_at_100 >= RECALL_TARGET {
        while reached.nprobe - short > 1 {
            let mid = short + (reached.nprobe - short) / 2;
            let m = measure(mid)?;
            if m.recall_at_100 >= RECALL_TARGET {
                reached = m;
            } else {
                short = mid;
            }
        }
    }
    tried.sort_by_key(|m| m.nprobe);
    Ok((reached, tried))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(ids: &[i64], k: usize) -> Hits {
        Hits {
            k,
            ids: ids.to_vec(),
            scores: vec![0.0; ids.len()],
        }
    }

    /// A measurement whose recall@100 is `recall(nprobe)`.
    fn at(nprobe: usize, recall: impl Fn(usize) -> f64) -> Result<NprobeRecall> {
        Ok(NprobeRecall {
            nprobe,
            recall_at_10: 0.0,
            recall_at_100: recall(nprobe),
        })
    }

    #[test]
    fn the_chosen_nprobe_is_the_smallest_reaching_the_target_not_the_next_power_of_two() {
        // Like the 1M-item benchmark: 32 lists just short of the target, 64 past it.
        let recall = |n: usize| {
            if n >= 41 {
                0.951
            } else {
                0.9 + n as f64 / 1000.0
            }
        };
        let (chosen, tried) = smallest_reaching(4000, |n| at(n, recall)).unwrap();
        assert_eq!(chosen.nprobe, 41);
        let probed: Vec<usize> = tried.iter().map(|m| m.nprobe).collect();
        assert_eq!(probed, [1, 2, 4, 8, 16, 32, 40, 41, 42, 44, 48, 64]);
        // Reached at 1, and never: every list, with the shortfall.
        let (one, tried) = smallest_reaching(4000, |n| at(n, |_| 0.99)).unwrap();
        assert_eq!((one.nprobe, tried.len()), (1, 1));
        let (all, _) = smallest_reaching(100, |n| at(n, |_| 0.5)).unwrap();
        assert_eq!(all.nprobe, 100);
        // A target first reached at nlist, which is not a power of two.
        let (last, _) =
            smallest_reaching(100, |n| at(n, |n| if n == 100 { 1.0 } else { 0.0 })).unwrap();
        assert_eq!(last.nprobe, 100);
    }

    #[test]
    fn recall_counts_overlap_and_small_catalogs() {
        let exact = hits(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 10);
        let approx = hits(&[1, 2, 3, 4, 5, 60, 70, 80, 90, 100], 10);
        assert!((recall_at(&approx, &exact, 10, 1) - 0.5).abs() < 1e-9);
        assert!((recall_at(&approx, &exact, 5, 1) - 1.0).abs() < 1e-9);
        // Three items in the catalog: -1 pads the rest; finding all three is recall 1.
        let exact = hits(&[3, 1, 2, -1, -1], 5);
        let approx = hits(&[1, 2, 3, -1, -1], 5);
        assert!((recall_at(&approx, &exact, 100, 1) - 1.0).abs() < 1e-9);
    }
}
