//! # indexer: from a catalog to a versioned, measured FAISS index
//!
//! Runs the item tower over every item, builds a FAISS IVF index on inner product, measures its
//! recall against exact search, and publishes it atomically under `INDEX_ROOT/<version>` with
//! `INDEX_ROOT/CURRENT` naming the served version.
//!
//! Data flow: features → towers → **indexer** (`INDEX_ROOT`) → server.

#[cfg(test)]
mod tests {
    //! Smoke test: proves the real (bundled, statically built) FAISS is linked.
    use faiss::{index_factory, read_index, write_index, Idx, Index, MetricType};
    use rand::{Rng, SeedableRng};

    #[test]
    fn ivf_index_trains_searches_and_round_trips_through_disk() {
        let (n, dim) = (2000usize, 16usize);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let data: Vec<f32> = (0..n * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut index = index_factory(dim as u32, "IVF16,Flat", MetricType::InnerProduct).unwrap();
        index.train(&data).unwrap();
        let ids: Vec<Idx> = (0..n as i64).map(|i| Idx::new((i * 10) as u64)).collect();
        index.add_with_ids(&data, &ids).unwrap();
        assert_eq!(index.ntotal(), n as u64);

        let query = &data[5 * dim..6 * dim];
        let found = index.search(query, 5).unwrap();
        assert!(found
            .labels
            .iter()
            .all(|l| l.get().is_some_and(|v| v % 10 == 0)));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.faiss");
        write_index(&index, path.to_str().unwrap()).unwrap();
        let mut back = read_index(path.to_str().unwrap()).unwrap();
        assert_eq!(back.ntotal(), n as u64);
        let again = back.search(query, 5).unwrap();
        assert_eq!(found.labels, again.labels);
        assert_eq!(found.distances, again.distances);
    }
}
