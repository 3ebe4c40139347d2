//! The second stage: re-ranking the towers' best candidates by what was bought together.
//!
//! On shop data the towers and item-to-item co-occurrence are about equally good and right about
//! different items: a vector of 128 numbers cannot hold every pair of products that sell
//! together, and co-occurrence cannot rank what the user has not yet touched the neighbours of.
//! So the towers retrieve the best `depth` candidates from the whole catalog, and each
//! candidate's score gains `weight · ln(1 + c)`, with `c` its item-kNN score against the user's
//! history: the cosine between two items' sets of training buyers, `|U_i ∩ U_j| / √(|U_i| |U_j|)`,
//! summed over the distinct items of the history. Evaluation and the server both call
//! [`Reranker::rescore`], so what is measured is what is served.
//!
//! Items nobody bought in training (new items) gain nothing: the re-ranker can only move them
//! down among warm candidates, which is why it is off unless a pipeline turns it on.
//!
//! Stored beside the weights as `cobuyers.safetensors`: `item_ids` (i64, `[M]`), `offsets`
//! (i64, `[M + 1]`) and `buyers` (i32, dense buyer indices, sorted within each item).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// The re-ranking settings in `model.json`, chosen on the validation split by the trainer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RerankInfo {
    /// Weight of `ln(1 + co-occurrence)` added to the dot product.
    pub weight: f32,
    /// Candidates the towers retrieve and the second stage re-scores.
    pub depth: usize,
    /// The co-buyer file, relative to `model.json`.
    pub file: String,
    /// sha256 of that file.
    pub sha256: String,
}

/// Who bought each item in training, as sorted lists of dense buyer indices.
#[derive(Debug, Clone, PartialEq)]
pub struct CoBuyers {
    item_ids: Vec<u64>,
    /// Item id → position in `item_ids`.
    position: HashMap<u64, u32>,
    /// `buyers[offsets[p]..offsets[p + 1]]` are the buyers of `item_ids[p]`.
    offsets: Vec<usize>,
    buyers: Vec<u32>,
    /// One more than the largest buyer index.
    buyer_count: usize,
}

thread_local! {
    /// Per-buyer weights of the history being scored, zero between calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl CoBuyers {
    /// From `(item id, buyer indices)` pairs; the lists are sorted and deduplicated here, and
    /// items without buyers are dropped.
    pub fn new(lists: impl IntoIterator<Item = (u64, Vec<u32>)>) -> CoBuyers {
        let (mut item_ids, mut offsets, mut buyers) = (Vec::new(), vec![0usize], Vec::new());
        let mut buyer_count = 0usize;
        for (id, mut list) in lists {
            list.sort_unstable();
            list.dedup();
            if list.is_empty() {
                continue;
            }
            buyer_count = buyer_count.max(*list.last().expect("non-empty") as usize + 1);
            item_ids.push(id);
            buyers.extend_from_slice(&list);
            offsets.push(buyers.len());
        }
        let position = item_ids
            .iter()
            .enumerate()
            .map(|(p, &id)| (id, p as u32))
            .collect();
        CoBuyers {
            item_ids,
            position,
            offsets,
            buyers,
            buyer_count,
        }
    }

    /// Items with at least one buyer.
    pub fn len(&self) -> usize {
        self.item_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.item_ids.is_empty()
    }

    fn buyers_of(&self, id: u64) -> Option<&[u32]> {
        let p = *self.position.get(&id)? as usize;
        Some(&self.buyers[self.offsets[p]..self.offsets[p + 1]])
    }

    /// Item-kNN scores of `candidates` against the distinct items of `history` (ids, in any
    /// order, repeats allowed): the summed cosine of their buyer sets. Candidates or history
    /// items without buyers contribute 0.
    pub fn scores(&self, history: &[u64], candidates: &[u64]) -> Vec<f32> {
        let mut distinct: Vec<u64> = history.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        SCRATCH.with(|cell| {
            let mut weights = cell.borrow_mut();
            if weights.len() < self.buyer_count {
                weights.resize(self.buyer_count, 0.0);
            }
            let mut touched: Vec<u32> = Vec::new();
            for list in distinct.iter().filter_map(|&h| self.buyers_of(h)) {
                let w = 1.0 / (list.len() as f32).sqrt();
                for &u in list {
                    if weights[u as usize] == 0.0 {
                        touched.push(u);
                    }
                    weights[u as usize] += w;
                }
            }
            let out = candidates
                .iter()
                .map(|&c| match self.buyers_of(c) {
                    Some(list) if !touched.is_empty() => {
                        let shared: f32 = list.iter().map(|&u| weights[u as usize]).sum();
                        shared / (list.len() as f32).sqrt()
                    }
                    _ => 0.0,
                })
                .collect();
            for u in touched {
                weights[u as usize] = 0.0;
            }
            out
        })
    }

    /// Writes the lists to `path` (a temporary sibling first, then a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let ids: Vec<i64> = self.item_ids.iter().map(|&i| i as i64).collect();
        let offsets: Vec<i64> = self.offsets.iter().map(|&o| o as i64).collect();
        let buyers: Vec<i32> = self.buyers.iter().map(|&b| b as i32).collect();
        let tensors = [
            ("item_ids", Tensor::from_slice(&ids)),
            ("offsets", Tensor::from_slice(&offsets)),
            ("buyers", Tensor::from_slice(&buyers)),
        ];
        let tmp = features::fsutil::hidden_sibling(path, "tmp");
        let bad = |reason: String| Error::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        Tensor::write_safetensors(&tensors, &tmp).map_err(|e| bad(e.to_string()))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| Error::io(path, e))
    }

    /// Reads lists written by [`CoBuyers::save`], refusing a file whose parts do not fit
    /// together (the error names the file and the part).
    pub fn load(path: &Path) -> Result<CoBuyers> {
        let bad = |reason: String| Error::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        let named = Tensor::read_safetensors(path).map_err(|e| bad(e.to_string()))?;
        let get = |name: &str, kind: Kind| -> Result<Tensor> {
            let t = named
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| bad(format!("no tensor `{name}`")))?;
            if t.kind() != kind || t.dim() != 1 {
                return Err(bad(format!(
                    "tensor `{name}` is {:?} of shape {:?}, expected a vector of {kind:?}",
                    t.kind(),
                    t.size()
                )));
            }
            Ok(t)
        };
        let as_vec = |name: &str, t: Tensor| -> Result<Vec<i64>> {
            Vec::<i64>::try_from(t.to_kind(Kind::Int64))
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))
        };
        let ids = as_vec("item_ids", get("item_ids", Kind::Int64)?)?;
        let offsets = as_vec("offsets", get("offsets", Kind::Int64)?)?;
        let buyers = as_vec("buyers", get("buyers", Kind::Int)?)?;
        if offsets.len() != ids.len() + 1 || offsets.first() != Some(&0) {
            return Err(bad(format!(
                "`offsets` has {} entries for {} items, expected {} starting at 0",
                offsets.len(),
                ids.len(),
                ids.len() + 1
            )));
        }
        if let Some(p) = offsets.windows(2).position(|w| w[1] <= w[0]) {
            return Err(bad(format!("`offsets` do not rise at item {p}")));
        }
        if *offsets.last().expect("non-empty") != buyers.len() as i64 {
            return Err(bad(format!(
                "`offsets` end at {}, but `buyers` has {} entries",
                offsets.last().expect("non-empty"),
                buyers.len()
            )));
        }
        if let Some(b) = buyers.iter().position(|&b| b < 0) {
            return Err(bad(format!("`buyers` entry {b} is negative")));
        }
        let lists = ids.iter().enumerate().map(|(p, &id)| {
            let range = offsets[p] as usize..offsets[p + 1] as usize;
            (id as u64, buyers[range].iter().map(|&b| b as u32).collect())
        });
        let loaded = CoBuyers::new(lists);
        if loaded.len() != ids.len() {
            return Err(bad("`item_ids` repeat an item".into()));
        }
        Ok(loaded)
    }
}

/// What the second stage adds to a candidate's dot product: `weight · ln(1 + co)`, with `co` its
/// item-kNN score ([`CoBuyers::scores`]). The logarithm keeps a long history, whose summed
/// cosines grow with its length, from drowning the towers' score.
pub fn blend(weight: f32, co: f32) -> f32 {
    weight * co.ln_1p()
}

/// The second stage, ready to score: settings plus the co-buyer lists.
pub struct Reranker {
    pub weight: f32,
    pub depth: usize,
    pub cobuyers: CoBuyers,
}

impl Reranker {
    /// Loads the co-buyer file `info` names in `model_dir`, checking its sha256.
    pub fn load(model_dir: &Path, info: &RerankInfo) -> Result<Reranker> {
        let path = model_dir.join(&info.file);
        crate::artifact::check_sha256(&path, &info.sha256)?;
        Ok(Reranker {
            weight: info.weight,
            depth: info.depth,
            cobuyers: CoBuyers::load(&path)?,
        })
    }

    /// Adds `weight · ln(1 + item-kNN)` to each candidate's towers score (`scores`, the dot
    /// product, one per id in `candidates`). The caller re-sorts.
    pub fn rescore(&self, history: &[u64], candidates: &[u64], scores: &mut [f32]) {
        let co = self.cobuyers.scores(history, candidates);
        for (s, c) in scores.iter_mut().zip(co) {
            *s += blend(self.weight, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[u32], b: &[u32]) -> f32 {
        let shared = a.iter().filter(|u| b.contains(u)).count() as f32;
        shared / ((a.len() * b.len()) as f32).sqrt()
    }

    #[test]
    fn scores_are_summed_buyer_set_cosines_over_distinct_history_items() {
        let lists = vec![
            (10, vec![0, 1, 2]),
            (20, vec![1, 2]),
            (30, vec![3]),
            (40, vec![2, 1, 1]),
        ];
        let co = CoBuyers::new(lists);
        let got = co.scores(&[10, 30, 10, 99], &[20, 40, 30, 99, 10]);
        let b10 = [0, 1, 2];
        let want = [cosine(&b10, &[1, 2]), cosine(&b10, &[1, 2]), 1.0, 0.0, 1.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        // The scratch space is clean for the next history.
        assert_eq!(co.scores(&[30], &[10, 20]), vec![0.0, 0.0]);
        assert_eq!(co.scores(&[], &[10]), vec![0.0]);
    }

    #[test]
    fn save_and_load_round_trip_and_a_broken_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cobuyers.safetensors");
        let co = CoBuyers::new(vec![(7, vec![3, 1]), (8, vec![]), (9, vec![0])]);
        co.save(&path).unwrap();
        assert_eq!(CoBuyers::load(&path).unwrap(), co);

        let offsets = Tensor::from_slice(&[0i64, 2, 1]);
        let broken = [
            ("item_ids", Tensor::from_slice(&[7i64, 9])),
            ("offsets", offsets),
            ("buyers", Tensor::from_slice(&[1i32, 3, 0])),
        ];
        Tensor::write_safetensors(&broken, &path).unwrap();
        let err = CoBuyers::load(&path).unwrap_err().to_string();
        assert!(err.contains("cobuyers.safetensors"), "{err}");
        assert!(err.contains("`offsets` do not rise"), "{err}");

        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = CoBuyers::load(&path).unwrap_err().to_string();
        assert!(err.contains("cobuyers.safetensors"), "{err}");
    }

    #[test]
    fn rescoring_adds_the_weighted_log_of_co_occurrence() {
        let reranker = Reranker {
            weight: 0.5,
            depth: 10,
            cobuyers: CoBuyers::new(vec![(1, vec![0]), (2, vec![0]), (3, vec![1])]),
        };
        let mut scores = [0.9f32, 0.8];
        reranker.rescore(&[1], &[3, 2], &mut scores);
        assert_eq!(scores[0], 0.9);
        assert!((scores[1] - (0.8 + 0.5 * 2f32.ln())).abs() < 1e-6);
    }
}
