//! The architecture of the two towers, in one serde struct saved next to the weights
//! (`model.json`), so a model directory fully describes how to rebuild its network.

use serde::{Deserialize, Serialize};

/// Non-linearity between MLP layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Relu,
    Gelu,
}

/// Sizes of the embedding tables, taken from the dataset's vocabularies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct VocabSizes {
    /// Title and query words (padding + vocabulary + hash buckets).
    pub title: i64,
    pub aspects: i64,
    pub categories: i64,
    pub user_features: i64,
    /// Item ids seen in training (padding + vocabulary + one unused bucket: 2 when the dataset
    /// records none).
    pub item_ids: i64,
    /// The last `title_buckets` rows of the title table are hash buckets for words outside the
    /// vocabulary (0: unknown, for models trained before it was recorded).
    pub title_buckets: i64,
}

/// Every architectural choice of the item and user encoders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TowerConfig {
    /// Dimension of the unit vectors both towers output (and of the FAISS index).
    pub dim: i64,
    /// Width of title and query word embeddings.
    pub token_dim: i64,
    /// Width of aspect embeddings.
    pub aspect_dim: i64,
    /// Width of category embeddings.
    pub category_dim: i64,
    /// Width of the item-id embedding next to the content (0: content only). Items not seen in
    /// training have no id row and are embedded from their content alone.
    pub item_id_dim: i64,
    /// Probability that an item's id is hidden in a training step, so the content path alone
    /// learns a useful vector (what a new item gets).
    pub item_id_dropout: f64,
    /// Title words outside the vocabulary land in hash buckets, where a word that only one
    /// movie or product has acts as a hashed id of that item, and for an item never seen in
    /// training as somebody else's. Above 0, such words are hidden from items not seen in
    /// training (item id 0) and, in training, from this share of the items, as ID dropout does
    /// for the id; 0 (the default) always keeps them.
    pub hashed_word_dropout: f64,
    /// Hidden layer widths of the item MLP (the output layer, of width `dim`, is added).
    pub item_hidden: Vec<i64>,
    /// Hidden size of the GRU over the user's events.
    pub gru_hidden: i64,
    /// Width of the event-type embedding added to each history event.
    pub event_type_dim: i64,
    /// Width of the time-gap bucket embedding added to each history event.
    pub gap_dim: i64,
    /// Width of the hour and weekday embeddings.
    pub context_dim: i64,
    /// Width of user-feature embeddings.
    pub user_feature_dim: i64,
    /// Hidden layer widths of the user MLP.
    pub user_hidden: Vec<i64>,
    pub activation: Activation,
    pub dropout: f64,
    /// Layer norm after each hidden layer.
    pub layer_norm: bool,
    /// Initial softmax temperature; scores are `u·v / temperature`.
    pub temperature: f64,
    /// Learn the temperature (kept within [0.01, 1]).
    pub learn_temperature: bool,
    /// Title words kept per item.
    pub max_title_tokens: usize,
    /// Aspects kept per item.
    pub max_aspects: usize,
    /// Category levels kept per item.
    pub max_categories: usize,
    /// Words kept per search query.
    pub max_query_tokens: usize,
    /// User features kept per user.
    pub max_user_features: usize,
    /// History events read per user (L); longer histories keep their most recent events.
    pub history_len: usize,
    /// Embedding table sizes; filled in from the vocabularies when training starts.
    pub vocab: VocabSizes,
}

impl Default for TowerConfig {
    fn default() -> Self {
        TowerConfig {
            dim: 64,
            token_dim: 64,
            aspect_dim: 32,
            category_dim: 32,
            item_id_dim: 0,
            item_id_dropout: 0.5,
            hashed_word_dropout: 0.0,
            item_hidden: vec![256],
            gru_hidden: 128,
            event_type_dim: 16,
            gap_dim: 16,
            context_dim: 8,
            user_feature_dim: 16,
            user_hidden: vec![256],
            activation: Activation::Relu,
            dropout: 0.1,
            layer_norm: true,
            temperature: 0.05,
            learn_temperature: true,
            max_title_tokens: 16,
            max_aspects: 16,
            max_categories: 8,
            max_query_tokens: 8,
            max_user_features: 8,
            history_len: 50,
            vocab: VocabSizes::default(),
        }
    }
}

impl TowerConfig {
    /// A narrow model: `width`-wide embeddings, GRU and output, hidden layers twice as wide, the
    /// GRU reading 10 events. It trains in seconds on small data: for smoke runs and tests.
    pub fn small(width: i64) -> TowerConfig {
        TowerConfig {
            dim: width,
            token_dim: width,
            gru_hidden: width,
            item_hidden: vec![2 * width],
            user_hidden: vec![2 * width],
            history_len: 10,
            ..TowerConfig::default()
        }
    }

    /// Checks that the configuration can build a network. Names the offending field.
    pub fn validate(&self) -> crate::Result<()> {
        let positive = [
            ("dim", self.dim),
            ("token_dim", self.token_dim),
            ("aspect_dim", self.aspect_dim),
            ("category_dim", self.category_dim),
            ("gru_hidden", self.gru_hidden),
            ("event_type_dim", self.event_type_dim),
            ("gap_dim", self.gap_dim),
            ("context_dim", self.context_dim),
            ("user_feature_dim", self.user_feature_dim),
            ("vocab.title", self.vocab.title),
            ("vocab.aspects", self.vocab.aspects),
            ("vocab.categories", self.vocab.categories),
            ("vocab.user_features", self.vocab.user_features),
        ];
        for (field, v) in positive {
            if v <= 0 {
                return Err(crate::Error::Config {
                    field: field.into(),
                    reason: format!("must be positive, got {v}"),
                });
            }
        }
        if self.item_id_dim < 0 {
            return Err(crate::Error::Config {
                field: "item_id_dim".into(),
                reason: format!("must be 0 (off) or positive, got {}", self.item_id_dim),
            });
        }
        if self.item_id_dim > 0 && self.vocab.item_ids <= 2 {
            return Err(crate::Error::Config {
                field: "vocab.item_ids".into(),
                reason: "the dataset records no item ids (prepared by an older version); \
                         prepare it again or set item_id_dim = 0"
                    .into(),
            });
        }
        for (field, p) in [
            ("item_id_dropout", self.item_id_dropout),
            ("hashed_word_dropout", self.hashed_word_dropout),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(crate::Error::Config {
                    field: field.into(),
                    reason: "must be in [0, 1]".into(),
                });
            }
        }
        if self.hashed_word_dropout > 0.0 && self.vocab.item_ids <= 2 {
            return Err(crate::Error::Config {
                field: "vocab.item_ids".into(),
                reason: "hashed_word_dropout needs to know which items training saw, and the \
                         dataset records no item ids (prepared by an older version); prepare it \
                         again or set hashed_word_dropout = 0"
                    .into(),
            });
        }
        if !(0..self.vocab.title).contains(&self.vocab.title_buckets) {
            return Err(crate::Error::Config {
                field: "vocab.title_buckets".into(),
                reason: format!(
                    "must be below vocab.title ({}), got {}",
                    self.vocab.title, self.vocab.title_buckets
                ),
            });
        }
        for (field, widths) in [
            ("item_hidden", &self.item_hidden),
            ("user_hidden", &self.user_hidden),
        ] {
            if widths.iter().any(|&w| w <= 0) {
                return Err(crate::Error::Config {
                    field: field.into(),
                    reason: "layer widths must be positive".into(),
                });
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(crate::Error::Config {
                field: "dropout".into(),
                reason: "must be in [0, 1)".into(),
            });
        }
        if !(0.01..=1.0).contains(&self.temperature) {
            return Err(crate::Error::Config {
                field: "temperature".into(),
                reason: "must be in [0.01, 1]".into(),
            });
        }
        let lengths = [
            ("max_title_tokens", self.max_title_tokens),
            ("max_aspects", self.max_aspects),
            ("max_categories", self.max_categories),
            ("max_query_tokens", self.max_query_tokens),
            ("max_user_features", self.max_user_features),
        ];
        for (field, v) in lengths {
            if v == 0 {
                return Err(crate::Error::Config {
                    field: field.into(),
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(item_ids: i64) -> TowerConfig {
        TowerConfig {
            item_id_dim: 8,
            vocab: VocabSizes {
                title: 10,
                aspects: 10,
                categories: 10,
                user_features: 10,
                item_ids,
                title_buckets: 4,
            },
            ..TowerConfig::default()
        }
    }

    #[test]
    fn item_ids_need_a_dataset_that_records_them() {
        // An empty item-id vocabulary (data prepared before item ids) has 2 rows.
        let err = sized(2).validate().unwrap_err().to_string();
        assert!(
            err.contains("vocab.item_ids") && err.contains("prepare it again"),
            "{err}"
        );
        sized(3).validate().unwrap();
        TowerConfig {
            item_id_dim: 0,
            ..sized(2)
        }
        .validate()
        .unwrap();
        let err = TowerConfig {
            item_id_dropout: 1.5,
            ..sized(3)
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("item_id_dropout"), "{err}");
        let err = TowerConfig {
            item_id_dim: 0,
            hashed_word_dropout: 0.5,
            ..sized(2)
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("vocab.item_ids") && err.contains("hashed_word_dropout"),
            "{err}"
        );
    }
}
