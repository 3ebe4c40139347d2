//! The user tower: a GRU over the user's recent events, plus context.
//!
//! Each history event is its content — the item tower's vector for the event's item (shared
//! weights), or for a search the mean of the query's word embeddings (the title word space)
//! projected to `dim` — concatenated with an event-type embedding and a time-gap bucket
//! embedding. The GRU runs oldest first over right-padded sequences and is read at each row's
//! last real step. That state, the mean and the most recent of the events' contents, the hour
//! and weekday embeddings and the user's pooled feature embeddings go through an MLP to a unit
//! vector. A user with no history gets zeros for all three, so the vector comes from context
//! alone.

use tch::nn::{self, Module, RNN};
use tch::{Kind, Tensor};

use crate::config::TowerConfig;
use crate::inputs::{UserInputs, GAP_BUCKETS};
use crate::layers::{l2_normalize, EmbeddingBag, Mlp};
use crate::recurrence::{self, GruWeights};

/// User history and context → unit vector of `dim`.
#[derive(Debug)]
pub struct UserEncoder {
    pub query_proj: nn::Linear,
    pub event_type_emb: nn::Embedding,
    pub gap_emb: nn::Embedding,
    pub gru: nn::GRU,
    pub hour_emb: nn::Embedding,
    pub weekday_emb: nn::Embedding,
    pub user_feature_emb: EmbeddingBag,
    pub mlp: Mlp,
    /// The GRU's weights, for the CPU inference path of its recurrence (`recurrence.rs`).
    gru_weights: Option<GruWeights>,
    gru_hidden: i64,
    dim: i64,
}

impl UserEncoder {
    pub fn new(p: nn::Path, cfg: &TowerConfig) -> Self {
        let emb = |name: &str, rows: i64, dim: i64| {
            nn::embedding(&p / name, rows, dim, Default::default())
        };
        let gru_input = cfg.dim + cfg.event_type_dim + cfg.gap_dim;
        let rnn_cfg = nn::RNNConfig {
            batch_first: true,
            ..Default::default()
        };
        let mlp_input = cfg.gru_hidden + 2 * cfg.dim + 2 * cfg.context_dim + cfg.user_feature_dim;
        UserEncoder {
            query_proj: nn::linear(
                &p / "query_proj",
                cfg.token_dim,
                cfg.dim,
                Default::default(),
            ),
            event_type_emb: emb(
                "event_type_emb",
                features::EventType::VOCAB_SIZE,
                cfg.event_type_dim,
            ),
            gap_emb: emb("gap_emb", GAP_BUCKETS, cfg.gap_dim),
            gru: nn::gru(&p / "gru", gru_input, cfg.gru_hidden, rnn_cfg),
            gru_weights: GruWeights::of(&(&p / "gru")),
            hour_emb: emb("hour_emb", 24, cfg.context_dim),
            weekday_emb: emb("weekday_emb", 7, cfg.context_dim),
            user_feature_emb: EmbeddingBag::new(
                &p / "user_feature_emb",
                cfg.vocab.user_features,
                cfg.user_feature_dim,
            ),
            mlp: Mlp::new(&p / "mlp", mlp_input, &cfg.user_hidden, cfg.dim, cfg),
            gru_hidden: cfg.gru_hidden,
            dim: cfg.dim,
        }
    }

    /// `[B, dim]` unit vectors. `item_vecs` (`[N, dim]`) are the item tower's vectors for the rows
    /// `users.hist_item` points at; `title_emb` is the item tower's word embedding.
    pub fn forward(
        &self,
        users: &UserInputs,
        item_vecs: &Tensor,
        title_emb: &EmbeddingBag,
        train: bool,
    ) -> Tensor {
        let b = users.batch_size();
        let l = users.hist_type.size()[1];
        let device = users.hist_len.device();
        let state = if l == 0 {
            Tensor::zeros([b, self.gru_hidden + 2 * self.dim], (Kind::Float, device))
        } else {
            self.history_state(users, item_vecs, title_emb, b, l)
        };
        let context = Tensor::cat(
            &[
                state,
                self.hour_emb.forward(&users.hour),
                self.weekday_emb.forward(&users.weekday),
                self.user_feature_emb.forward(&users.user_features),
            ],
            -1,
        );
        l2_normalize(&self.mlp.forward(&context, train))
    }

    fn history_state(
        &self,
        users: &UserInputs,
        item_vecs: &Tensor,
        title_emb: &EmbeddingBag,
        b: i64,
        l: i64,
    ) -> Tensor {
        let device = users.hist_len.device();
        let item_vecs = if item_vecs.size()[0] == 0 {
            Tensor::zeros([1, self.dim], (Kind::Float, device))
        } else {
            item_vecs.shallow_clone()
        };
        let items = item_vecs
            .index_select(0, &users.hist_item.flatten(0, -1))
            .view([b, l, self.dim]);
        let items = &users.hist_is_item * items;
        let content = if users.hist_query.size()[2] == 0 {
            items // no search in this batch
        } else {
            let queries = self
                .query_proj
                .forward(&title_emb.forward(&users.hist_query));
            items + (1.0 - &users.hist_is_item) * queries
        };
        let x = Tensor::cat(
            &[
                content.shallow_clone(),
                self.event_type_emb.forward(&users.hist_type),
                self.gap_emb.forward(&users.hist_gap),
            ],
            -1,
        );
        let out = self
            .gru_weights
            .as_ref()
            .and_then(|w| recurrence::gru_cpu(&x, w))
            .unwrap_or_else(|| self.gru.seq(&x).0);
        // Read each row at its last real step; rows without history get zeros.
        let last = (&users.hist_len - 1).clamp_min(0).view([b, 1, 1]);
        let at_last = |t: &Tensor, width: i64| {
            t.gather(1, &last.expand([b, 1, width], false), false)
                .squeeze_dim(1)
        };
        let state = at_last(&out, self.gru_hidden);
        // Next to the GRU state, the mean of the events' contents (long-term taste) and the most
        // recent event's content (what the user is doing now) reach the MLP directly.
        let real = Tensor::arange(l, (Kind::Int64, device))
            .unsqueeze(0)
            .lt_tensor(&users.hist_len.unsqueeze(1));
        let real = real.to_kind(Kind::Float).unsqueeze(-1);
        let mean = (&content * &real).sum_dim_intlist(1, false, Kind::Float)
            / users
                .hist_len
                .clamp_min(1)
                .to_kind(Kind::Float)
                .unsqueeze(-1);
        let recent = at_last(&content, self.dim);
        let has = users.hist_len.gt(0).to_kind(Kind::Float).unsqueeze(-1);
        Tensor::cat(&[state, mean, recent], -1) * has
    }
}
