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
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let mask = ids.ne(0).to_kind(Kind::Float).unsqueeze(-1);
        let summed = (self.emb.forward(ids) * &mask).sum_dim_intlist(-2, false, Kind::Float);
        summed / mask.sum_dim_intlist(-2, false, Kind::Float).clamp_min(1.0)
    }
}

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
                h = h.dropout(self.dropout, train);
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
    fn l2_normalize_gives_unit_rows() {
        let x = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0]).view([2, 2]);
        let n = l2_normalize(&x);
        assert!(n
            .get(0)
            .allclose(&Tensor::from_slice(&[0.6f32, 0.8]), 1e-6, 1e-6, false));
        assert_eq!(n.get(1).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
