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
use tch::{Device, Kind, Tensor};

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
    /// The GRU's weights, for the CPU recurrence (`recurrence.rs`).
    gru_weights: GruWeights,
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
            gru_weights: GruWeights::of(&(&p / "gru")).expect("nn::gru creates the four weights"),
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
        let (content, queries) = self.history_content(users, &item_vecs, title_emb);
        let state = if device == Device::Cpu {
            self.packed_state(users, &item_vecs, queries.as_ref(), b)
        } else {
            self.libtorch_state(users, &content)
        };
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
        let recent = at_last(&content, &users.hist_len);
        let has = users.hist_len.gt(0).to_kind(Kind::Float).unsqueeze(-1);
        Tensor::cat(&[state, mean, recent], -1) * has
    }

    /// `[B, L, dim]` each history event's content: its item's vector, or for a search its
    /// projected query; with the projected queries (`None` when the batch holds no search), which
    /// the CPU recurrence projects on to its input gates.
    fn history_content(
        &self,
        users: &UserInputs,
        item_vecs: &Tensor,
        title_emb: &EmbeddingBag,
    ) -> (Tensor, Option<Tensor>) {
        let (b, l) = (users.batch_size(), users.hist_item.size()[1]);
        let items = item_vecs
            .index_select(0, &users.hist_item.flatten(0, -1))
            .view([b, l, self.dim]);
        let items = if users.every_event_is_item {
            items
        } else {
            &users.hist_is_item * items
        };
        let queries = (users.hist_query.size()[2] > 0).then(|| {
            self.query_proj
                .forward(&title_emb.forward(&users.hist_query))
        });
        let content = match &queries {
            Some(queries) => items + (1.0 - &users.hist_is_item) * queries,
            None => items,
        };
        (content, queries)
    }

    /// The GRU state after each row's last event, as `recurrence::last_states` runs it (the CPU).
    ///
    /// An event's input is its content, its type embedding and its gap embedding side by side,
    /// so its input gates are the sum of three products with column blocks of `W_ih`. A batch's
    /// history events point at far fewer distinct items than there are events (about 1,100
    /// against 4,500 in a training batch of ml-100k), so each item's vector is projected once
    /// and gathered, and so is each (type, gap) pair's, with `b_ih` folded in. Where the item
    /// table is larger than the batch's events (evaluation against a whole catalog), the events'
    /// vectors are gathered first and projected instead.
    fn packed_state(
        &self,
        users: &UserInputs,
        item_vecs: &Tensor,
        queries: Option<&Tensor>,
        b: i64,
    ) -> Tensor {
        let w = &self.gru_weights;
        let gates = 3 * self.gru_hidden;
        let type_dim = self.event_type_emb.ws.size()[1];
        let w_content = w.w_ih.narrow(1, 0, self.dim).tr();
        let w_type = w.w_ih.narrow(1, self.dim, type_dim).tr();
        let w_gap = w
            .w_ih
            .narrow(1, self.dim + type_dim, self.gap_emb.ws.size()[1])
            .tr();
        // `[B, L, ...]` → `[E, ...]`: the real events, packed as the recurrence runs them.
        let packed = |t: &Tensor| t.flatten(0, 1).index_select(0, &users.hist_packed);
        let rows = packed(&users.hist_item);
        let events = users.hist_packed.size()[0];
        let content_gates = if item_vecs.size()[0] <= events {
            item_vecs.matmul(&w_content).index_select(0, &rows)
        } else {
            item_vecs.index_select(0, &rows).matmul(&w_content)
        };
        let type_gap = (self.event_type_emb.ws.matmul(&w_type).unsqueeze(1)
            + self.gap_emb.ws.matmul(&w_gap).unsqueeze(0)
            + &w.b_ih)
            .view([-1, gates]);
        let type_gap_rows = packed(&(&users.hist_type * GAP_BUCKETS + &users.hist_gap));
        let type_gap = type_gap.index_select(0, &type_gap_rows);
        // Where every event is an item the mask is all ones, and a search's term all zeros.
        let is_item = (!users.every_event_is_item).then(|| packed(&users.hist_is_item));
        let mut input_gates = match &is_item {
            None => content_gates + type_gap,
            Some(is_item) => content_gates * is_item + type_gap,
        };
        if let (Some(queries), Some(is_item)) = (queries, &is_item) {
            input_gates += packed(queries).matmul(&w_content) * (1.0 - is_item);
        }
        let states = recurrence::last_states(&input_gates, &users.hist_running, b, w);
        states.index_select(0, &users.hist_rank)
    }

    /// The GRU state after each row's last event through libtorch's GRU over `[content, type,
    /// gap]`: on CUDA that is cuDNN's fused recurrence.
    fn libtorch_state(&self, users: &UserInputs, content: &Tensor) -> Tensor {
        let x = Tensor::cat(
            &[
                content.shallow_clone(),
                self.event_type_emb.forward(&users.hist_type),
                self.gap_emb.forward(&users.hist_gap),
            ],
            -1,
        );
        at_last(&self.gru.seq(&x).0, &users.hist_len)
    }
}

/// `[B, L, W]` read at each row's last real step (step 0 for a row without events).
fn at_last(t: &Tensor, hist_len: &Tensor) -> Tensor {
    let (b, width) = (t.size()[0], t.size()[2]);
    let last = (hist_len - 1).clamp_min(0).view([b, 1, 1]);
    t.gather(1, &last.expand([b, 1, width], false), false)
        .squeeze_dim(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VocabSizes;
    use crate::inputs::{EventInput, UserBatchHost, UserInput};
    use tch::nn::VarStore;

    /// Users with histories of every shape: empty, item events, searches, an item the table
    /// lacks (a type-only event), lengths from 1 to past `history_len`.
    fn users(n: usize) -> Vec<UserInput> {
        (0..n)
            .map(|u| UserInput {
                history: (0..(u * 7) % 11)
                    .map(|e| EventInput {
                        event_type: 1 + (e % 3) as i64,
                        item_row: (e % 4 != 3).then_some(((u + e) % 5) as i64),
                        query: if e % 4 == 3 && u % 2 == 0 {
                            vec![3, 4]
                        } else {
                            vec![]
                        },
                        gap_s: (e * 1000) as i64,
                    })
                    .collect(),
                hour: (u % 24) as u8,
                weekday: (u % 7) as u8,
                user_features: vec![1 + (u % 3) as i64],
            })
            .collect()
    }

    /// A small user tower (dim 8, GRU 6, 8 events) and a title table of 20 words.
    fn small_tower() -> (TowerConfig, VarStore, UserEncoder, EmbeddingBag) {
        let cfg = TowerConfig {
            dim: 8,
            token_dim: 8,
            gru_hidden: 6,
            history_len: 8,
            vocab: VocabSizes {
                title: 20,
                user_features: 5,
                ..Default::default()
            },
            ..Default::default()
        };
        let vs = VarStore::new(Device::Cpu);
        let user = UserEncoder::new(vs.root() / "user", &cfg);
        let title = EmbeddingBag::new(vs.root() / "title", 20, 8);
        (cfg, vs, user, title)
    }

    #[test]
    fn the_packed_cpu_state_equals_libtorchs_gru_with_gradients() {
        tch::manual_seed(3);
        let (cfg, vs, user, title) = small_tower();
        // 5 item rows (fewer than the batch's events: projected, then gathered) and 500 (more:
        // gathered, then projected).
        for items in [5, 500] {
            let batch = users(30);
            let inputs = UserBatchHost::new(&batch, &cfg).to_device(Device::Cpu);
            let b = inputs.batch_size();
            assert!(inputs.hist_query.size()[2] > 0, "the batch has searches");
            let item_vecs =
                Tensor::randn([items, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let (content, queries) = user.history_content(&inputs, &item_vecs, &title);
            let packed = user.packed_state(&inputs, &item_vecs, queries.as_ref(), b);
            let reference = user.libtorch_state(&inputs, &content)
                * inputs.hist_len.gt(0).to_kind(Kind::Float).unsqueeze(-1);
            let diff = (&packed - &reference).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{items} items: states differ by {diff}");
            let probe = Tensor::randn([b, 6], (Kind::Float, Device::Cpu));
            let mut wrt: Vec<Tensor> = vs.trainable_variables();
            wrt.push(item_vecs.shallow_clone());
            let grads = |out: &Tensor| {
                Tensor::run_backward(&[(out * &probe).sum(Kind::Float)], &wrt, true, true)
            };
            let mut compared = 0;
            for (i, (p, r)) in grads(&packed).iter().zip(grads(&reference)).enumerate() {
                // Variables outside the GRU state (the MLP, context embeddings) get none.
                assert_eq!(p.defined(), r.defined(), "gradient {i}");
                if !p.defined() {
                    continue;
                }
                compared += 1;
                let diff = (p - r).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{items} items: gradient {i} differs by {diff}");
            }
            // The GRU's four, the type and gap tables, the query projection's two, the word
            // table, the item vectors.
            assert_eq!(compared, 10);
        }
    }

    #[test]
    fn without_searches_or_missing_items_skipping_the_item_mask_changes_nothing() {
        tch::manual_seed(4);
        let (cfg, _vs, user, title) = small_tower();
        let mut batch = users(30);
        for e in batch.iter_mut().flat_map(|u| u.history.iter_mut()) {
            e.item_row.get_or_insert(2);
            e.query.clear();
        }
        let host = UserBatchHost::new(&batch, &cfg);
        let item_vecs = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
        let skipping = host.to_device(Device::Cpu);
        assert!(skipping.every_event_is_item);
        let mut masking = host.to_device(Device::Cpu);
        masking.every_event_is_item = false;
        let (a, b) = (
            user.forward(&skipping, &item_vecs, &title, false),
            user.forward(&masking, &item_vecs, &title, false),
        );
        assert!((a - b).abs().max().double_value(&[]) < 1e-6);
        // One search is enough to keep the mask.
        batch[3].history.last_mut().unwrap().item_row = None;
        assert!(
            !UserBatchHost::new(&batch, &cfg)
                .to_device(Device::Cpu)
                .every_event_is_item
        );
    }
}
