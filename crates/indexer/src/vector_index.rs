//! A FAISS index on inner product, shared by reference across threads.
//!
//! The `faiss` crate's `Index::search` takes `&mut self`, which would force a lock around every
//! search in the server. FAISS's own search is `const` and safe to call concurrently, so
//! [`VectorIndex::search`] calls the C API directly with per-call search parameters (nprobe),
//! leaving the index untouched. Mutation (train, add, reset) still needs `&mut self`.

use std::ffi::CStr;
use std::path::Path;

use faiss::index::IndexImpl;
use faiss::{Idx, Index, MetricType};
use faiss_sys as sys;
use features::table::MAX_ITEM_ID;

use crate::error::{Error, Result};

/// Search results for a batch of queries, row-major: query `q` owns `[q*k, (q+1)*k)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hits {
    pub k: usize,
    /// Item ids; `-1` where the index had fewer than `k` results.
    pub ids: Vec<i64>,
    /// Inner products, best first.
    pub scores: Vec<f32>,
}

impl Hits {
    /// `(item_id, score)` of query `q`, skipping empty slots.
    pub fn of(&self, q: usize) -> impl Iterator<Item = (u64, f32)> + '_ {
        let range = q * self.k..(q + 1) * self.k;
        self.ids[range.clone()]
            .iter()
            .zip(&self.scores[range])
            .filter(|(&id, _)| id >= 0)
            .map(|(&id, &s)| (id as u64, s))
    }
}

/// The inverted lists one query probes and its score against each list's centroid: the first
/// half of an IVF search, found for a batch of queries at once ([`VectorIndex::probes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Probes {
    lists: Vec<i64>,
    scores: Vec<f32>,
}

/// A FAISS index whose vectors carry item ids.
pub struct VectorIndex {
    inner: IndexImpl,
    dim: usize,
    nlist: Option<usize>,
    nprobe: Option<usize>,
}

// SAFETY: FAISS indexes have no thread affinity. Shared access only reaches `search`, which
// calls FAISS's `const` search (documented as thread-safe for CPU indexes); every mutation takes
// `&mut self`.
unsafe impl Sync for VectorIndex {}
unsafe impl Send for VectorIndex {}

impl VectorIndex {
    /// Builds an empty index from a FAISS factory string on inner product. Factories without an
    /// inverted file (`Flat`, `HNSW32`, `PQ16`) are wrapped in `IDMap` so that items keep their ids.
    pub fn new(factory: &str, dim: usize) -> Result<VectorIndex> {
        let description = if factory.contains("IVF") || factory.starts_with("IDMap") {
            factory.to_string()
        } else {
            format!("IDMap,{factory}")
        };
        let inner = faiss::index_factory(dim as u32, &description, MetricType::InnerProduct)
            .map_err(|e| Error::Faiss {
                op: format!("factory `{factory}`"),
                reason: e.to_string(),
            })?;
        Ok(Self::wrap(inner, dim))
    }

    fn wrap(inner: IndexImpl, dim: usize) -> VectorIndex {
        let ivf = find_ivf(inner.inner_ptr());
        let (nlist, nprobe) = if ivf.is_null() {
            (None, None)
        } else {
            // SAFETY: `ivf` is non-null and points into `inner`.
            unsafe {
                (
                    Some(sys::faiss_IndexIVF_nlist(ivf)),
                    Some(sys::faiss_IndexIVF_nprobe(ivf)),
                )
            }
        };
        VectorIndex {
            inner,
            dim,
            nlist,
            nprobe,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Vectors in the index.
    pub fn len(&self) -> usize {
        self.inner.ntotal() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inverted lists, for IVF indexes.
    pub fn nlist(&self) -> Option<usize> {
        self.nlist
    }

    /// Lists probed when a search names no nprobe, for IVF indexes.
    pub fn default_nprobe(&self) -> Option<usize> {
        self.nprobe
    }

    /// Whether the index still needs [`train`](Self::train) before vectors can be added.
    pub fn needs_training(&self) -> bool {
        !self.inner.is_trained()
    }

    /// Sets the nprobe used when a search names none; saved with the index.
    pub fn set_default_nprobe(&mut self, nprobe: usize) -> Result<()> {
        let ivf = find_ivf(self.inner.inner_ptr());
        if ivf.is_null() {
            return Err(Error::invalid("nprobe only applies to IVF indexes"));
        }
        let nprobe = nprobe.clamp(1, self.nlist.unwrap_or(1));
        // SAFETY: `ivf` is non-null and we hold `&mut self`.
        unsafe { sys::faiss_IndexIVF_set_nprobe(ivf, nprobe) };
        self.nprobe = Some(nprobe);
        Ok(())
    }

    /// Trains the quantizer (and codes) on `vectors` (row-major, `dim` wide).
    pub fn train(&mut self, vectors: &[f32]) -> Result<()> {
        self.inner.train(vectors).map_err(|e| Error::Faiss {
            op: "train".into(),
            reason: e.to_string(),
        })
    }

    /// Adds vectors under their item ids (at most 2^63 - 1: FAISS ids are signed).
    pub fn add(&mut self, ids: &[u64], vectors: &[f32]) -> Result<()> {
        debug_assert_eq!(ids.len() * self.dim, vectors.len());
        if let Some(id) = ids.iter().find(|&&id| id > MAX_ITEM_ID) {
            return Err(Error::invalid(format!(
                "item id {id} is above {MAX_ITEM_ID}, the largest id FAISS can store"
            )));
        }
        let ids: Vec<Idx> = ids.iter().map(|&i| Idx::new(i)).collect();
        self.inner
            .add_with_ids(vectors, &ids)
            .map_err(|e| Error::Faiss {
                op: "add".into(),
                reason: e.to_string(),
            })
    }

    /// Removes every vector but keeps the training (quantizer, codebooks): how `index add`
    /// re-fills an index without retraining it.
    pub fn reset(&mut self) -> Result<()> {
        // SAFETY: live index, exclusive access.
        check("reset", unsafe {
            sys::faiss_Index_reset(self.inner.inner_ptr())
        })
    }

    /// The `k` best items for each query (row-major, `dim` wide), probing `nprobe` lists (IVF
    /// only; `None` uses the default). Safe to call from many threads at once.
    pub fn search(&self, queries: &[f32], k: usize, nprobe: Option<usize>) -> Result<Hits> {
        let n = self.query_count(queries)?;
        let mut hits = Hits {
            k,
            ids: vec![-1; n * k],
            scores: vec![f32::NEG_INFINITY; n * k],
        };
        if n == 0 || k == 0 {
            return Ok(hits);
        }
        let ptr = self.inner.inner_ptr();
        let mut params: *mut sys::FaissSearchParametersIVF = std::ptr::null_mut();
        if let (Some(nlist), Some(nprobe)) = (self.nlist, nprobe) {
            // SAFETY: out-pointer to a fresh parameter object, freed below.
            check("search parameters", unsafe {
                sys::faiss_SearchParametersIVF_new_with(
                    &mut params,
                    std::ptr::null_mut(),
                    nprobe.clamp(1, nlist),
                    0,
                )
            })?;
        }
        // SAFETY: buffers are sized n*dim and n*k; `params` is null or a live IVF parameter
        // object, and FAISS's search does not mutate the index.
        let rc = unsafe {
            sys::faiss_Index_search_with_params(
                ptr,
                n as i64,
                queries.as_ptr(),
                k as i64,
                params as *const sys::FaissSearchParameters,
                hits.scores.as_mut_ptr(),
                hits.ids.as_mut_ptr(),
            )
        };
        if !params.is_null() {
            // SAFETY: created above, not used after this.
            unsafe { sys::faiss_SearchParameters_free(params as *mut sys::FaissSearchParameters) };
        }
        check("search", rc)?;
        Ok(hits)
    }

    /// For each query (row-major), the lists a search at the default nprobe probes, found by one
    /// search of the coarse quantizer over the whole batch. FAISS scores 20 or more queries
    /// against the centroids with one matrix product, reading the centroids once rather than
    /// once per query: for the server's micro-batches of users that is most of the quantizer's
    /// cost ([`search_probed`](Self::search_probed) then scans each query's lists). `None` where
    /// the index is not an inverted file at the top (flat, HNSW, a pre-transform such as OPQ).
    pub fn probes(&self, queries: &[f32]) -> Result<Option<Vec<Probes>>> {
        let Some((ivf, nprobe)) = self.top_ivf() else {
            return Ok(None);
        };
        let n = self.query_count(queries)?;
        let mut lists = vec![-1i64; n * nprobe];
        let mut scores = vec![f32::NEG_INFINITY; n * nprobe];
        if n > 0 {
            // SAFETY: `ivf` points into `self.inner`, which owns its quantizer; buffers are sized
            // n*dim and n*nprobe; a flat quantizer's search is `const`.
            check("coarse search", unsafe {
                sys::faiss_Index_search(
                    sys::faiss_IndexIVF_quantizer(ivf),
                    n as i64,
                    queries.as_ptr(),
                    nprobe as i64,
                    scores.as_mut_ptr(),
                    lists.as_mut_ptr(),
                )
            })?;
        }
        Ok(Some(
            lists
                .chunks(nprobe)
                .zip(scores.chunks(nprobe))
                .map(|(lists, scores)| Probes {
                    lists: lists.to_vec(),
                    scores: scores.to_vec(),
                })
                .collect(),
        ))
    }

    /// The `k` best items for one query, scanning the lists `probes` names (from
    /// [`probes`](Self::probes) on this index): what `search(query, k, None)` returns.
    pub fn search_probed(&self, query: &[f32], k: usize, probes: &Probes) -> Result<Hits> {
        let top = self.top_ivf();
        let Some((ivf, _)) = top.filter(|&(_, nprobe)| nprobe == probes.lists.len()) else {
            return Err(Error::invalid(format!(
                "{} probed lists do not fit this index (nprobe {:?})",
                probes.lists.len(),
                top.map(|(_, nprobe)| nprobe)
            )));
        };
        if self.query_count(query)? != 1 {
            return Err(Error::invalid("a probed search takes one query"));
        }
        let mut hits = Hits {
            k,
            ids: vec![-1; k],
            scores: vec![f32::NEG_INFINITY; k],
        };
        if k == 0 {
            return Ok(hits);
        }
        // SAFETY: `ivf` points into `self.inner`; `probes` holds nprobe lists and scores, the
        // outputs k slots; FAISS's preassigned search is `const` and, without parameters, probes
        // the index's own nprobe, which `probes` was made with.
        check("search", unsafe {
            sys::faiss_IndexIVF_search_preassigned(
                ivf,
                1,
                query.as_ptr(),
                k as i64,
                probes.lists.as_ptr(),
                probes.scores.as_ptr(),
                hits.scores.as_mut_ptr(),
                hits.ids.as_mut_ptr(),
                0,
            )
        })?;
        Ok(hits)
    }

    /// The index itself as an inverted file, with the lists its default search probes:
    /// min(nlist, nprobe), as FAISS clamps it (the stride of a batch's probed lists). `None`
    /// for a flat or HNSW index, or an inverted file behind a pre-transform.
    fn top_ivf(&self) -> Option<(*mut sys::FaissIndexIVF, usize)> {
        // SAFETY: a live index; the cast returns null on mismatch.
        let ivf = unsafe { sys::faiss_IndexIVF_cast(self.inner.inner_ptr()) };
        let nprobe = self.nprobe?.clamp(1, self.nlist?);
        (!ivf.is_null()).then_some((ivf, nprobe))
    }

    /// How many `dim`-wide queries `queries` holds.
    fn query_count(&self, queries: &[f32]) -> Result<usize> {
        if !queries.len().is_multiple_of(self.dim) {
            return Err(Error::invalid(format!(
                "query buffer of {} floats is not a multiple of dim {}",
                queries.len(),
                self.dim
            )));
        }
        Ok(queries.len() / self.dim)
    }

    /// Writes the index to `path` (not atomically: callers write inside a staging directory),
    /// fsynced. Through a `FILE` of our own rather than FAISS's by-name write, which reports a
    /// failed final flush (a full disk, a quota, NFS) only as a `close error` line on stderr: the
    /// truncated file was then published as the current version.
    pub fn write(&self, path: &Path) -> Result<()> {
        let name = std::ffi::CString::new(path_str(path)?).map_err(|_| Error::BadFile {
            path: path.to_path_buf(),
            reason: "path holds a NUL byte".into(),
        })?;
        let io_err = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        // SAFETY: a valid C string and mode; the FILE is closed exactly once below.
        let file = unsafe { libc::fopen(name.as_ptr(), c"wb".as_ptr()) };
        if file.is_null() {
            return Err(io_err(std::io::Error::last_os_error()));
        }
        // SAFETY: a live index and an open FILE.
        let rc = unsafe { sys::faiss_write_index(self.inner.inner_ptr(), file.cast()) };
        // SAFETY: the FILE is open; after fclose it is not used again.
        let flushed = unsafe { libc::fflush(file) == 0 && libc::fsync(libc::fileno(file)) == 0 };
        let flush_error = std::io::Error::last_os_error();
        let closed = unsafe { libc::fclose(file) == 0 };
        let close_error = std::io::Error::last_os_error();
        check(&format!("write {}", path.display()), rc)?;
        if !flushed {
            return Err(io_err(flush_error));
        }
        if !closed {
            return Err(io_err(close_error));
        }
        Ok(())
    }

    /// Reads an index written by [`write`](Self::write).
    pub fn read(path: &Path) -> Result<VectorIndex> {
        if !path.is_file() {
            return Err(Error::BadFile {
                path: path.to_path_buf(),
                reason: "missing".into(),
            });
        }
        let inner = faiss::read_index(path_str(path)?).map_err(|e| Error::BadFile {
            path: path.to_path_buf(),
            reason: format!("FAISS cannot read it: {e}"),
        })?;
        let dim = inner.d() as usize;
        if inner.metric_type() != MetricType::InnerProduct {
            return Err(Error::BadFile {
                path: path.to_path_buf(),
                reason: "not an inner-product index".into(),
            });
        }
        Ok(Self::wrap(inner, dim))
    }
}

/// The inverted-file index inside `ptr`, looking through pre-transforms (`OPQ16_64,IVF…`);
/// null when there is none.
fn find_ivf(ptr: *mut sys::FaissIndex) -> *mut sys::FaissIndexIVF {
    // SAFETY: `ptr` is a live index owned by the caller; the casts return null on mismatch, and
    // a pre-transform's inner index lives as long as the pre-transform.
    unsafe {
        let ivf = sys::faiss_IndexIVF_cast(ptr);
        if !ivf.is_null() {
            return ivf;
        }
        let pre = sys::faiss_IndexPreTransform_cast(ptr);
        if pre.is_null() {
            return std::ptr::null_mut();
        }
        find_ivf(sys::faiss_IndexPreTransform_index(pre))
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| Error::BadFile {
        path: path.to_path_buf(),
        reason: "path is not UTF-8".into(),
    })
}

fn check(op: &str, rc: std::os::raw::c_int) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: FAISS returns a thread-local, NUL-terminated message (or null).
    let reason = unsafe {
        let msg = sys::faiss_get_last_error();
        if msg.is_null() {
            format!("error code {rc}")
        } else {
            CStr::from_ptr(msg).to_string_lossy().into_owned()
        }
    };
    Err(Error::Faiss {
        op: op.into(),
        reason,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    pub(crate) fn unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut v: Vec<f32> = (0..n * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        for row in v.chunks_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    #[test]
    fn ivf_search_with_full_nprobe_is_exact_and_shared_across_threads() {
        let (n, dim) = (3000, 16);
        let data = unit_vectors(n, dim, 1);
        let ids: Vec<u64> = (0..n as u64).map(|i| 1000 + i * 3).collect();
        let mut index = VectorIndex::new("IVF32,Flat", dim).unwrap();
        assert_eq!(index.nlist(), Some(32));
        assert!(index.needs_training());
        index.train(&data).unwrap();
        index.add(&ids, &data).unwrap();
        index.set_default_nprobe(4).unwrap();
        let query = &data[7 * dim..8 * dim];
        let hits = index.search(query, 10, Some(32)).unwrap();
        let (best, score) = hits.of(0).next().unwrap();
        assert_eq!(best, 1000 + 7 * 3);
        assert!((score - 1.0).abs() < 1e-5);
        let index = std::sync::Arc::new(index);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let index = std::sync::Arc::clone(&index);
                let q = query.to_vec();
                std::thread::spawn(move || index.search(&q, 10, Some(32)).unwrap())
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), hits);
        }
    }

    /// The same items in the same order, the scores equal but for the last bits: a residual
    /// code's score adds the query's centroid score, which a batch's matrix product sums in
    /// another order than a single query's dot product.
    pub(crate) fn assert_same_hits(a: &Hits, b: &Hits) {
        assert_eq!(a.ids, b.ids);
        for (x, y) in a.scores.iter().zip(&b.scores) {
            assert!((x - y).abs() < 1e-5, "{a:?} against {b:?}");
        }
    }

    #[test]
    fn a_probed_search_returns_what_the_plain_search_returns_at_the_default_nprobe() {
        let (n, dim) = (3000, 16);
        let data = unit_vectors(n, dim, 4);
        let ids: Vec<u64> = (0..n as u64).map(|i| 7 + i * 2).collect();
        let mut index = VectorIndex::new("IVF32,SQ8", dim).unwrap();
        index.train(&data).unwrap();
        index.add(&ids, &data).unwrap();
        index.set_default_nprobe(5).unwrap();
        // 25 queries: FAISS scores them against the centroids with one matrix product; 3: one
        // query at a time. Both must probe the lists the plain search probes.
        for batch in [25, 3] {
            let queries = unit_vectors(batch, dim, 5 + batch as u64);
            let probes = index.probes(&queries).unwrap().expect("an IVF index");
            assert_eq!(probes.len(), batch);
            for (q, probes) in queries.chunks(dim).zip(&probes) {
                assert_eq!(probes.lists.len(), 5);
                assert_same_hits(
                    &index.search_probed(q, 10, probes).unwrap(),
                    &index.search(q, 10, None).unwrap(),
                );
            }
        }
        // Probes made at another nprobe are refused, not read past their end.
        let probes = index.probes(&data[..dim]).unwrap().unwrap();
        index.set_default_nprobe(8).unwrap();
        let err = index
            .search_probed(&data[..dim], 10, &probes[0])
            .unwrap_err();
        assert!(err.to_string().contains("nprobe"), "{err}");
        // No inverted file at the top: the plain search finds its own way.
        let mut flat = VectorIndex::new("Flat", dim).unwrap();
        flat.add(&ids, &data).unwrap();
        assert_eq!(flat.probes(&data[..dim]).unwrap(), None);
        let mut opq = VectorIndex::new("OPQ4_16,IVF16,Flat", dim).unwrap();
        opq.train(&data).unwrap();
        opq.add(&ids, &data).unwrap();
        assert_eq!(opq.probes(&data[..dim]).unwrap(), None);
    }

    #[test]
    fn non_ivf_factories_keep_ids_and_bad_factories_are_named() {
        let (n, dim) = (200, 8);
        let data = unit_vectors(n, dim, 2);
        let ids: Vec<u64> = (0..n as u64).map(|i| i * 11).collect();
        for factory in ["Flat", "HNSW8"] {
            let mut index = VectorIndex::new(factory, dim).unwrap();
            assert_eq!(index.nlist(), None);
            index.add(&ids, &data).unwrap();
            let hits = index.search(&data[3 * dim..4 * dim], 1, None).unwrap();
            assert_eq!(hits.ids[0], 33, "{factory}");
        }
        let err = VectorIndex::new("IVFbogus,Flat", dim)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("IVFbogus"), "{err}");
    }

    #[test]
    fn reset_keeps_training_and_read_back_is_identical() {
        let (n, dim) = (1000, 8);
        let data = unit_vectors(n, dim, 3);
        let ids: Vec<u64> = (0..n as u64).collect();
        let mut index = VectorIndex::new("IVF8,Flat", dim).unwrap();
        index.train(&data).unwrap();
        index.add(&ids, &data).unwrap();
        index.reset().unwrap();
        assert_eq!(index.len(), 0);
        assert!(!index.needs_training());
        index.add(&ids, &data).unwrap();
        index.set_default_nprobe(3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.faiss");
        index.write(&path).unwrap();
        let back = VectorIndex::read(&path).unwrap();
        assert_eq!(back.default_nprobe(), Some(3));
        assert_eq!(back.len(), n);
        let q = &data[..4 * dim];
        assert_eq!(
            back.search(q, 5, None).unwrap(),
            index.search(q, 5, None).unwrap()
        );
    }

    #[test]
    fn an_index_file_the_disk_could_not_take_is_an_error_not_a_truncated_file() {
        // Small enough to sit in the FILE's buffer until the final flush.
        let (n, dim) = (10, 8);
        let data = unit_vectors(n, dim, 5);
        let ids: Vec<u64> = (0..n as u64).collect();
        let mut index = VectorIndex::new("Flat", dim).unwrap();
        index.add(&ids, &data).unwrap();
        // Every write to /dev/full fails with ENOSPC; buffered, FAISS's own writes may only fail
        // at the final flush, which its by-name write left unreported.
        let err = index.write(Path::new("/dev/full")).unwrap_err().to_string();
        assert!(err.contains("/dev/full"), "{err}");
    }
}
