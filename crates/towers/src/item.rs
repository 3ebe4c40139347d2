//! The item tower: content, and optionally the item's own id.
//!
//! Title words, aspects and categories are each embedded and mean-pooled, concatenated, and
//! passed through an MLP to a unit vector. With `item_id_dim > 0` an item-id embedding joins
//! them (a hybrid tower): items with identical content (shop catalogs are full of them) get
//! distinct vectors, and an item's id can learn what its content cannot say. An item not seen in
//! training has id 0, whose embedding is zeros, so it is embedded from its content alone; ID
//! dropout in training hides ids at random so that this content-only vector is a good one.
//! Title words outside the vocabulary (hash buckets) are ids too, hashed ones: with
//! `hashed_word_dropout` they are hidden the same way.

use tch::nn::{self, Module};
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
    /// `None` without item ids (`item_id_dim = 0`).
    pub id_emb: Option<nn::Embedding>,
    pub mlp: Mlp,
    id_dropout: f64,
    /// `(hashed_word_dropout, first hash-bucket title id)`; `None` when hashed words are always
    /// kept (the setting is 0, or an older model does not record its buckets).
    hashed_words: Option<(f64, i64)>,
}

impl ItemEncoder {
    pub fn new(p: nn::Path, cfg: &TowerConfig) -> Self {
        let input = cfg.token_dim + cfg.aspect_dim + cfg.category_dim + cfg.item_id_dim;
        let id_emb = (cfg.item_id_dim > 0).then(|| {
            let init = nn::EmbeddingConfig {
                ws_init: nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.1,
                },
                ..Default::default()
            };
            nn::embedding(&p / "id_emb", cfg.vocab.item_ids, cfg.item_id_dim, init)
        });
        let hashed_words = (cfg.hashed_word_dropout > 0.0 && cfg.vocab.title_buckets > 0)
            .then_some((
                cfg.hashed_word_dropout,
                cfg.vocab.title - cfg.vocab.title_buckets,
            ));
        ItemEncoder {
            id_emb,
            id_dropout: cfg.item_id_dropout,
            hashed_words,
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
        let hiding = if train {
            Hiding::Random
        } else {
            Hiding::Unseen
        };
        self.forward_hiding(items, train, hiding)
    }

    /// `[N, dim]` unit vectors with the id-like inputs hidden as `hiding` says.
    pub fn forward_hiding(&self, items: &ItemInputs, train: bool, hiding: Hiding) -> Tensor {
        let hide = |rate: f64| hidden_items(&items.ids, rate, hiding);
        let title = self.visible_title(&items.title, hide);
        let mut parts = vec![
            self.title_emb.forward(&title),
            self.aspect_emb.forward(&items.aspects),
            self.category_emb.forward(&items.categories),
        ];
        if let Some(id_emb) = &self.id_emb {
            let keep = hide(self.id_dropout).logical_not();
            parts.push(id_emb.forward(&items.ids) * keep.to_kind(tch::Kind::Float).unsqueeze(-1));
        }
        l2_normalize(&self.mlp.forward(&Tensor::cat(&parts, -1), train))
    }

    /// `[N, T]` title ids with the hash-bucket words set to padding for the items `hidden`
    /// marks at the `hashed_word_dropout` rate (see [`Hiding`]); all kept when the setting is 0.
    /// A word that lands in a bucket is rare by construction, so for a seen item it says "this
    /// item", and for a new one it says "some other item whose word shares the bucket": noise.
    fn visible_title(&self, title: &Tensor, hidden: impl Fn(f64) -> Tensor) -> Tensor {
        let Some((dropout, first_bucket)) = self.hashed_words else {
            return title.shallow_clone();
        };
        let hide = hidden(dropout);
        let hashed = title.ge(first_bucket);
        title.masked_fill(&hashed.logical_and(&hide.unsqueeze(-1)), 0)
    }
}

/// Which items' id-like inputs (the id, hash-bucket title words) a forward hides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hiding {
    /// Items not seen in training only: what serving and evaluation embed.
    Unseen,
    /// Items not seen in training and a random share of the rest: training.
    Random,
    /// Every item: the content-only vector a new item would get.
    All,
}

/// `[N]` bool: the items whose id-like inputs are hidden in this forward, as `hiding` says: the
/// ones not seen in training (id 0) and, with [`Hiding::Random`], a random `rate` share of the
/// rest. ID dropout and hashed word dropout hide by the same rule, so that what training sees
/// without them is what a new item gets.
fn hidden_items(ids: &Tensor, rate: f64, hiding: Hiding) -> Tensor {
    if hiding == Hiding::All {
        return ids.ones_like().to_kind(tch::Kind::Bool);
    }
    let unseen = ids.le(0);
    if !(hiding == Hiding::Random && rate > 0.0) {
        return unseen;
    }
    unseen.logical_or(&crate::noise::bernoulli(&ids.size(), rate, ids.device()))
}
