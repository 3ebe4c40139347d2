//! The item tower: content only.
//!
//! Title words, aspects and categories are each embedded and mean-pooled, concatenated, and
//! passed through an MLP to a unit vector. There is deliberately no item-id embedding: an item
//! that appears after training (cold start) is embedded from its content like any other.

use tch::nn;
use tch::Tensor;

use crate::config::TowerConfig;
use crate::inputs::ItemInputs;
use crate::layers::{l2_normalize, EmbeddingBag, Mlp};

/// Item content → unit vector of `dim`.
#[derive(Debug)]
pub struct ItemEncoder {
    /// Word embeddings, shared with the user tower for search queries.
    pub title_emb: EmbeddingBag,
    pub aspect_emb: EmbeddingBag,
    pub category_emb: EmbeddingBag,
    pub mlp: Mlp,
}

impl ItemEncoder {
    pub fn new(p: nn::Path, cfg: &TowerConfig) -> Self {
        let input = cfg.token_dim + cfg.aspect_dim + cfg.category_dim;
        ItemEncoder {
            title_emb: EmbeddingBag::new(&p / "title_emb", cfg.vocab.title, cfg.token_dim),
            aspect_emb: EmbeddingBag::new(&p / "aspect_emb", cfg.vocab.aspects, cfg.aspect_dim),
            category_emb: EmbeddingBag::new(
                &p / "category_emb",
                cfg.vocab.categories,
                cfg.category_dim,
            ),
            mlp: Mlp::new(&p / "mlp", input, &cfg.item_hidden, cfg.dim, cfg),
        }
    }

    /// `[N, dim]` unit vectors.
    pub fn forward(&self, items: &ItemInputs, train: bool) -> Tensor {
        let x = Tensor::cat(
            &[
                self.title_emb.forward(&items.title),
                self.aspect_emb.forward(&items.aspects),
                self.category_emb.forward(&items.categories),
            ],
            -1,
        );
        l2_normalize(&self.mlp.forward(&x, train))
    }
}
