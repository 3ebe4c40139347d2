//! Item-id embeddings that start from co-occurrence instead of noise.
//!
//! A shop's long tail of products is each a training target only a handful of times, too few
//! for a randomly initialised id embedding to learn much in a few epochs. What those products
//! do have is who bought them: the same signal item-kNN ranks by. So the id table starts as a
//! low-rank code of it. With `r̂_i` the item's binary vector over training users scaled to unit
//! length, `r̂_i · r̂_j` is item-kNN's cosine; its best rank-`k` approximation is `c_i · c_j` with
//! `c_i = r̂_i W` and `W` the top `k` right singular vectors of the item × user matrix. Training
//! then refines the table as usual. Items that were never a training target keep id 0 and the
//! content-only path, exactly as with a random start.
//!
//! The SVD is randomized (Halko, Martinsson and Tropp): a few sparse products with the
//! item × user matrix and QR factorisations of tall, thin matrices, never a dense item × user
//! or item × item matrix.

use tch::{Device, Kind, Tensor};
use towers::dataset::{Catalog, ExampleSet};

use crate::baselines::training_buyers;

/// Columns added to the random range finder beyond the rank asked for.
const OVERSAMPLING: i64 = 16;
/// Power iterations of the range finder: the spectrum of purchase data decays slowly.
const POWER_ITERATIONS: usize = 4;
/// Root mean square of the table's entries: the same scale as the random start
/// (`towers::item`, normal with standard deviation 0.1), so the MLP sees inputs of the size
/// it was tuned for.
const ENTRY_RMS: f64 = 0.1;

/// `[id_rows, dim]`: for every item-id row, the projection of its training buyers onto the top
/// `dim` singular directions of the item × user matrix of training targets, scaled to
/// [`ENTRY_RMS`]. Rows of ids no training example has (padding, the unused bucket) are zero, as
/// are trailing columns when the data has fewer users or ids than `dim`. Draws from libtorch's
/// global generator, so the result follows the training seed.
pub fn cooccurrence_embeddings(
    train: &ExampleSet,
    catalog: &Catalog,
    id_rows: i64,
    dim: i64,
) -> Tensor {
    let opts = (Kind::Float, Device::Cpu);
    // Item ids are one per catalog item (0 for items never a training target), so each id row
    // takes its catalog row's buyers.
    let (buyers_of, users) = training_buyers(train, catalog.len());
    let (mut rows, mut cols, mut values) = (Vec::new(), Vec::new(), Vec::new());
    for (buyers, tokens) in buyers_of.iter().zip(&catalog.tokens) {
        if tokens.id <= 0 || tokens.id >= id_rows || buyers.is_empty() {
            continue;
        }
        let unit = 1.0 / (buyers.len() as f32).sqrt();
        for &u in buyers {
            rows.push(tokens.id);
            cols.push(u as i64);
            values.push(unit);
        }
    }
    let users = users as i64;
    let rank = dim.min(users).min(id_rows);
    if rows.is_empty() || rank == 0 {
        return Tensor::zeros([id_rows, dim], opts);
    }
    let sparse = |a: &[i64], b: &[i64], size: [i64; 2]| {
        let n = a.len() as i64;
        let indices = Tensor::cat(&[Tensor::from_slice(a), Tensor::from_slice(b)], 0).view([2, n]);
        Tensor::sparse_coo_tensor_indices_size(
            &indices,
            &Tensor::from_slice(&values),
            size,
            opts,
            false,
        )
        .coalesce()
    };
    // R: [ids, users], row i = r̂_i; and its transpose, kept apart (sparse × dense only).
    let r = sparse(&rows, &cols, [id_rows, users]);
    let rt = sparse(&cols, &rows, [users, id_rows]);

    let width = (rank + OVERSAMPLING).min(users).min(id_rows);
    let orthonormal = |y: &Tensor| Tensor::linalg_qr(y, "reduced").0;
    let mut q = orthonormal(&r.mm(&Tensor::randn([users, width], opts)));
    for _ in 0..POWER_ITERATIONS {
        let z = orthonormal(&rt.mm(&q));
        q = orthonormal(&r.mm(&z));
    }
    // B = Qᵀ R ([width, users]) has R's top right singular vectors.
    let b = rt.mm(&q).tr();
    let (_, _, v) = b.svd(true, true);
    let w = v.narrow(1, 0, rank);
    let code = r.mm(&w);
    let rms = code.square().mean(Kind::Float).sqrt().double_value(&[]);
    let code = if rms > 0.0 {
        code * (ENTRY_RMS / rms)
    } else {
        code
    };
    if rank < dim {
        Tensor::cat(&[code, Tensor::zeros([id_rows, dim - rank], opts)], 1)
    } else {
        code
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use features::ItemTokens;
    use towers::dataset::EncodedExample;

    fn catalog(ids: &[i64]) -> Catalog {
        Catalog {
            ids: (0..ids.len() as u64).collect(),
            tokens: ids
                .iter()
                .map(|&id| ItemTokens {
                    id,
                    ..Default::default()
                })
                .collect(),
            row_of: (0..ids.len() as u64).map(|i| (i, i as u32)).collect(),
        }
    }

    /// A catalog of `ids` in row order, without content: enough for the scorers that rank by
    /// rows (baselines, co-occurrence).
    pub(crate) fn bare_catalog(ids: Vec<u64>) -> Catalog {
        Catalog {
            row_of: ids
                .iter()
                .enumerate()
                .map(|(r, &id)| (id, r as u32))
                .collect(),
            tokens: vec![ItemTokens::default(); ids.len()],
            ids,
        }
    }

    /// Training examples of `(user, target row)` pairs without history: who bought what.
    pub(crate) fn bought(pairs: &[(u64, u32)]) -> ExampleSet {
        ExampleSet {
            examples: pairs
                .iter()
                .map(|&(user_id, target_row)| EncodedExample {
                    user_id,
                    ts_ms: 0,
                    target_row,
                    history: Vec::new(),
                    hour: 0,
                    weekday: 0,
                    user_features: Vec::new(),
                })
                .collect(),
            queries: Vec::new(),
        }
    }

    fn cosine(a: &Tensor, b: &Tensor) -> f64 {
        (a.dot(b) / (a.norm() * b.norm())).double_value(&[])
    }

    #[test]
    fn items_bought_by_the_same_users_get_the_same_direction() {
        // Catalog rows 0..4 have id rows 1..5; row 4 has no id (never a target).
        let catalog = catalog(&[1, 2, 3, 4, 0]);
        // Users 1 and 2 buy items 0 and 1; users 3 and 4 buy items 2 and 3; user 5 buys 1 and 3.
        let train = bought(&[
            (1, 0),
            (1, 1),
            (2, 0),
            (2, 1),
            (3, 2),
            (3, 3),
            (4, 2),
            (4, 3),
            (5, 1),
            (5, 3),
        ]);
        tch::manual_seed(1);
        let c = cooccurrence_embeddings(&train, &catalog, 6, 4);
        assert_eq!(c.size(), [6, 4]);
        let row = |i: i64| c.get(i);
        // Id 0 (padding) and the unused id 5 stay zero.
        assert_eq!(row(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(row(5).abs().sum(Kind::Float).double_value(&[]), 0.0);
        // Same buyers, same direction; disjoint buyers, orthogonal: the code keeps the cosines.
        assert!(cosine(&row(1), &row(2)) > 0.8, "{c}");
        assert!(cosine(&row(3), &row(4)) > 0.8, "{c}");
        assert!(cosine(&row(1), &row(3)).abs() < 1e-4, "{c}");
        // Scaled to the random start's size.
        let rms = c.narrow(0, 1, 4).square().mean(Kind::Float).sqrt();
        assert!(rms.double_value(&[]) > 0.05, "{c}");
    }

    #[test]
    fn more_dimensions_than_users_leaves_the_rest_zero() {
        let catalog = catalog(&[1, 2]);
        let train = bought(&[(1, 0), (1, 1), (2, 1)]);
        let c = cooccurrence_embeddings(&train, &catalog, 3, 8);
        assert_eq!(c.size(), [3, 8]);
        let tail = c.narrow(1, 2, 6).abs().sum(Kind::Float).double_value(&[]);
        assert_eq!(tail, 0.0);
        assert!(c.isfinite().all().int64_value(&[]) == 1);
    }
}
