//! The two building blocks both towers share: a masked mean-pooled embedding ("embedding bag")
//! and an MLP.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::config::{Activation, TowerConfig};

/// An embedding table whose lookups are averaged over non-padding ids (id 0 is padding).
/// An all-padding row pools to the zero vector rather than NaN.
#[derive(Debug)]
pub struct EmbeddingBag {
    pub emb: nn::Embedding,
}

impl EmbeddingBag {
    pub fn new(p: nn::Path, rows: i64, dim: i64) -> Self {
        let cfg = nn::EmbeddingConfig {
            padding_idx: 0,
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.1,
            },
            ..Default::default()
        };
        EmbeddingBag {
            emb: nn::embedding(p, rows, dim, cfg),
        }
    }

    /// `ids`: `[..., T]` int64 → `[..., dim]` mean over the non-zero ids.
    ///
    /// One fused `embedding_bag` (mean, padding 0) rather than a lookup, a mask product, a sum
    /// and a division: it never materialises the `[..., T, dim]` lookups, forward or backward.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let size = ids.size();
        let (lead, width) = size.split_at(size.len() - 1);
        let dim = self.emb.ws.size()[1];
        let out_size: Vec<i64> = lead.iter().copied().chain([dim]).collect();
        let (bags, width) = (lead.iter().product::<i64>(), width[0]);
        if bags == 0 || width == 0 {
            return Tensor::zeros(out_size, (Kind::Float, ids.device()));
        }
        let offsets =
            Tensor::arange_start_step(0, bags * width, width, (Kind::Int64, ids.device()));
        let (pooled, _, _, _) = Tensor::embedding_bag_padding_idx(
            &self.emb.ws,
            &ids.reshape([-1]),
            &offsets,
            false,
            EMBEDDING_BAG_MEAN,
            false,
            None::<Tensor>,
            false,
            0,
        );
        pooled.view(out_size.as_slice())
    }
}

/// `mode` of libtorch's `embedding_bag`: 0 sum, 1 mean, 2 max.
const EMBEDDING_BAG_MEAN: i64 = 1;

/// Linear layers with activation, optional layer norm and dropout between them; the last layer
/// is linear only.
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<nn::Linear>,
    norms: Vec<nn::LayerNorm>,
    activation: Activation,
    dropout: f64,
}

impl Mlp {
    /// `widths`: hidden widths, then `out` is appended as the output layer.
    pub fn new(p: nn::Path, input: i64, widths: &[i64], out: i64, cfg: &TowerConfig) -> Self {
        let mut layers = Vec::new();
        let mut norms = Vec::new();
        let mut prev = input;
        for (i, &w) in widths.iter().chain(std::iter::once(&out)).enumerate() {
            layers.push(nn::linear(
                &p / format!("linear{i}"),
                prev,
                w,
                Default::default(),
            ));
            if cfg.layer_norm && i < widths.len() {
                norms.push(nn::layer_norm(
                    &p / format!("norm{i}"),
                    vec![w],
                    Default::default(),
                ));
            }
            prev = w;
        }
        Mlp {
            layers,
            norms,
            activation: cfg.activation,
            dropout: cfg.dropout,
        }
    }

    pub fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let last = self.layers.len() - 1;
        let mut h = xs.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h);
            if i < last {
                if let Some(norm) = self.norms.get(i) {
                    h = norm.forward(&h);
                }
                h = match self.activation {
                    Activation::Relu => h.relu(),
                    Activation::Gelu => h.gelu("none"),
                };
                h = crate::noise::dropout(&h, self.dropout, train);
            }
        }
        h
    }
}

/// Scales rows to unit L2 norm (zero rows stay zero).
pub fn l2_normalize(xs: &Tensor) -> Tensor {
    xs / xs.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    #[test]
    fn embedding_bag_ignores_padding_and_handles_empty_rows() {
        let vs = VarStore::new(Device::Cpu);
        let bag = EmbeddingBag::new(vs.root() / "bag", 5, 3);
        let ids = Tensor::from_slice(&[1i64, 2, 0, 0, 0, 0]).view([2, 3]);
        let out = bag.forward(&ids);
        let expected = (bag.emb.ws.get(1) + bag.emb.ws.get(2)) / 2.0;
        assert!(out.get(0).allclose(&expected, 1e-6, 1e-6, false));
        assert_eq!(out.get(1).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn fused_embedding_bag_equals_the_masked_mean_with_gradients_and_any_leading_shape() {
        let vs = VarStore::new(Device::Cpu);
        let bag = EmbeddingBag::new(vs.root() / "bag", 7, 4);
        // [2, 3, 3]: bags with padding, a bag of padding only, repeats.
        let ids = Tensor::from_slice(&[1i64, 2, 0, 0, 0, 0, 3, 3, 6, 5, 0, 1, 2, 2, 2, 0, 4, 0])
            .view([2, 3, 3]);
        let fused = bag.forward(&ids);
        let mask = ids.ne(0).to_kind(Kind::Float).unsqueeze(-1);
        let by_hand = (bag.emb.forward(&ids) * &mask).sum_dim_intlist(-2, false, Kind::Float)
            / mask.sum_dim_intlist(-2, false, Kind::Float).clamp_min(1.0);
        assert_eq!(fused.size(), [2, 3, 4]);
        assert!(fused.allclose(&by_hand, 1e-6, 1e-6, false));
        let w = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu));
        let grad_of = |out: &Tensor| {
            let g =
                Tensor::run_backward(&[(out * &w).sum(Kind::Float)], &[&bag.emb.ws], false, false);
            g[0].shallow_clone()
        };
        let (g_fused, g_hand) = (grad_of(&fused), grad_of(&by_hand));
        assert!(g_fused.allclose(&g_hand, 1e-6, 1e-6, false));
        assert_eq!(
            g_fused.get(0).abs().sum(Kind::Float).double_value(&[]),
            0.0,
            "padding learns nothing"
        );
        let empty = bag.forward(&Tensor::zeros([5, 0], (Kind::Int64, Device::Cpu)));
        assert_eq!(empty.size(), [5, 4]);
    }

    #[test]
    fn l2_normalize_gives_unit_rows() {
        let x = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0]).view([2, 2]);
        let n = l2_normalize(&x);
        assert!(n
            .get(0)
            .allclose(&Tensor::from_slice(&[0.6f32, 0.8]), 1e-6, 1e-6, false));
        assert_eq!(n.get(1).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
