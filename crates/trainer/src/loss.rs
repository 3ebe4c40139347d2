//! The training objective: in-batch sampled softmax with logQ correction, accidental-hit
//! removal and optional uniformly sampled extra negatives (mixed negative sampling).
//!
//! Each row's positive is its own target; the candidates are every target in the batch plus the
//! extra negatives. Popular items appear as in-batch negatives more often than they would under
//! the full softmax, so each candidate's logit is lowered by the log of its expected count in
//! the candidate set (Yi et al., 2019). Another row's positive that is the same item as this
//! row's positive is not a negative at all, so it is masked out.

use tch::{Device, Kind, Tensor};
use towers::{Hiding, ItemInputs, TwoTower, UserInputs};

use crate::batches::{HostBatch, UserPart};

/// A batch on the training device (see [`HostBatch`]).
pub struct DeviceBatch {
    pub items: ItemInputs,
    pub parts: Vec<DeviceUsers>,
    /// Row (in `items`) of each candidate.
    pub candidates: Tensor,
    pub layout: CandidateLayout,
}

/// One part of a batch's users on the training device (see [`UserPart`]).
pub struct DeviceUsers {
    pub users: UserInputs,
    pub item_rows: Option<Tensor>,
    pub rows: i64,
}

/// The whole batch's candidates, as the softmax sees them.
pub struct CandidateLayout {
    pub candidate_catalog_rows: Tensor,
    pub candidate_log_q: Tensor,
    /// Flat `[B · C]` positions of candidates the row's user saw before (may be empty).
    pub seen_candidates: Tensor,
    pub size: i64,
}

impl CandidateLayout {
    /// The same tensors, for another thread.
    pub fn shallow_clone(&self) -> CandidateLayout {
        CandidateLayout {
            candidate_catalog_rows: self.candidate_catalog_rows.shallow_clone(),
            candidate_log_q: self.candidate_log_q.shallow_clone(),
            seen_candidates: self.seen_candidates.shallow_clone(),
            size: self.size,
        }
    }
}

impl DeviceBatch {
    pub fn new(host: &HostBatch, device: Device) -> DeviceBatch {
        DeviceBatch {
            items: host.items.to_device(device),
            parts: host
                .parts
                .iter()
                .map(|p| DeviceUsers::new(p, device))
                .collect(),
            candidates: Tensor::from_slice(&host.candidates).to_device(device),
            layout: CandidateLayout {
                candidate_catalog_rows: Tensor::from_slice(&host.candidate_catalog_rows)
                    .to_device(device),
                candidate_log_q: Tensor::from_slice(&host.candidate_log_q).to_device(device),
                seen_candidates: Tensor::from_slice(&host.seen_candidates).to_device(device),
                size: host.size as i64,
            },
        }
    }
}

impl DeviceUsers {
    pub fn new(host: &UserPart, device: Device) -> DeviceUsers {
        DeviceUsers {
            users: host.users.to_device(device),
            item_rows: host
                .item_rows
                .as_ref()
                .map(|r| Tensor::from_slice(r).to_device(device)),
            rows: host.rows as i64,
        }
    }

    /// The item vectors this part's histories point at, from the batch's `item_vecs`.
    pub fn own_items(&self, item_vecs: &Tensor) -> Tensor {
        match &self.item_rows {
            Some(rows) => item_vecs.index_select(0, rows),
            None => item_vecs.shallow_clone(),
        }
    }

    /// `[rows, dim]` user vectors (training mode) given the vectors of [`own_items`].
    ///
    /// [`own_items`]: Self::own_items
    pub fn encode(&self, model: &TwoTower, own_items: &Tensor) -> Tensor {
        model.encode_users(&self.users, own_items, true)
    }
}

/// Mean cross-entropy of each row's positive against all candidates. Accidental hits (another
/// row's positive that is this row's item) are masked when `remove_accidental_hits`, and the
/// batch's `seen_candidates` always (the batch holds none unless they are to be removed).
pub fn in_batch_softmax_loss(
    model: &TwoTower,
    batch: &DeviceBatch,
    remove_accidental_hits: bool,
) -> Tensor {
    let item_vecs = model.encode_items(&batch.items, true);
    let users: Vec<Tensor> = batch
        .parts
        .iter()
        .map(|p| p.encode(model, &p.own_items(&item_vecs)))
        .collect();
    let users = match users.as_slice() {
        [one] => one.shallow_clone(),
        _ => Tensor::cat(&users, 0),
    };
    let candidates = item_vecs.index_select(0, &batch.candidates);
    softmax_rows(
        model,
        &users,
        &candidates,
        &batch.layout,
        0,
        remove_accidental_hits,
    )
}

/// The rows `first..first + n` of [`in_batch_softmax_loss`], given those rows' `[n, dim]` user
/// vectors and the batch's `[C, dim]` candidate vectors: their cross-entropy summed and divided
/// by the batch's size, so that the rows of a batch's parts add up to its loss.
pub fn softmax_rows(
    model: &TwoTower,
    user_vecs: &Tensor,
    candidates: &Tensor,
    layout: &CandidateLayout,
    first: i64,
    remove_accidental_hits: bool,
) -> Tensor {
    let logits = model.logits(user_vecs, candidates).to_kind(Kind::Float)
        - layout.candidate_log_q.unsqueeze(0);
    let (b, n) = (layout.size, user_vecs.size()[0]);
    let c = candidates.size()[0];
    let device = logits.device();
    let rows = Tensor::arange_start(first, first + n, (Kind::Int64, device));
    let mut masked: Option<Tensor> = None;
    if remove_accidental_hits {
        let positives = layout.candidate_catalog_rows.narrow(0, first, n);
        let same_item = positives
            .unsqueeze(1)
            .eq_tensor(&layout.candidate_catalog_rows.unsqueeze(0));
        let own = Tensor::arange(c, (Kind::Int64, device))
            .unsqueeze(0)
            .eq_tensor(&rows.unsqueeze(1));
        masked = Some(same_item.logical_and(&own.logical_not()));
    }
    if layout.seen_candidates.numel() > 0 {
        let seen = Tensor::zeros([b * c], (Kind::Bool, device))
            .index_fill(0, &layout.seen_candidates, 1)
            .view([b, c])
            .narrow(0, first, n);
        masked = Some(match masked {
            Some(m) => m.logical_or(&seen),
            None => seen,
        });
    }
    let logits = match masked {
        Some(m) => logits.masked_fill(&m, -1e9),
        None => logits,
    };
    let picked = logits
        .log_softmax(-1, Kind::Float)
        .gather(1, &rows.unsqueeze(1), false);
    -picked.sum(Kind::Float) / b as f64
}

/// `1 − cosine` between each of the batch's items' content-only vector (its id hidden, and its
/// hash-bucket words with `hashed_word_dropout > 0`: what a new item gets) and its full vector,
/// held fixed; the mean over the batch's items. The full vector is what the softmax learned the
/// item to be; the content path is pulled towards it, not the other way round. Both forwards
/// run in training mode, each with its own MLP dropout mask (this is the variant measured in
/// `docs/benchmarks.md`), so with dropout the term also asks for vectors that dropout moves
/// little.
pub fn content_alignment_loss(model: &TwoTower, batch: &DeviceBatch) -> Tensor {
    alignment_sum(model, &batch.items) / batch.items.len().max(1) as f64
}

/// The sum of [`content_alignment_loss`]'s term over `items`.
pub fn alignment_sum(model: &TwoTower, items: &ItemInputs) -> Tensor {
    let full = tch::no_grad(|| model.encode_items_hiding(items, true, Hiding::Unseen));
    let content = model.encode_items_hiding(items, true, Hiding::All);
    let cosine = (content * full).sum_dim_intlist(-1, false, Kind::Float);
    (cosine.ones_like() - cosine).sum(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use towers::inputs::ItemTokens;
    use towers::{EventInput, ItemBatchHost, TowerConfig, UserBatchHost, UserInput, VocabSizes};

    fn batch(cfg: &TowerConfig, targets: &[i64], log_q: Vec<f32>) -> DeviceBatch {
        let tokens: Vec<ItemTokens> = (1..=4)
            .map(|i| ItemTokens {
                title: vec![i],
                aspects: vec![i],
                categories: vec![i],
                id: 0,
            })
            .collect();
        let refs: Vec<&ItemTokens> = tokens.iter().collect();
        let users: Vec<UserInput> = targets
            .iter()
            .map(|_| UserInput {
                history: vec![EventInput {
                    event_type: 1,
                    item_row: Some(0),
                    query: vec![],
                    gap_s: 1,
                }],
                ..Default::default()
            })
            .collect();
        let host = HostBatch {
            items: ItemBatchHost::new(&refs, cfg),
            parts: vec![UserPart {
                users: UserBatchHost::new(&users, cfg),
                item_rows: None,
                rows: targets.len(),
            }],
            candidates: targets.to_vec(),
            candidate_catalog_rows: targets.to_vec(),
            candidate_log_q: log_q,
            seen_candidates: Vec::new(),
            size: targets.len(),
        };
        DeviceBatch::new(&host, Device::Cpu)
    }

    fn cfg() -> TowerConfig {
        TowerConfig {
            dim: 8,
            token_dim: 8,
            gru_hidden: 8,
            dropout: 0.0,
            vocab: VocabSizes {
                title: 10,
                aspects: 10,
                categories: 10,
                user_features: 4,
                item_ids: 8,
                title_buckets: 0,
            },
            ..Default::default()
        }
    }

    #[test]
    fn loss_matches_hand_computed_cross_entropy() {
        tch::manual_seed(3);
        let cfg = cfg();
        let model = TwoTower::new(cfg.clone(), Device::Cpu).unwrap();
        let b = batch(&cfg, &[0, 1, 2], vec![0.0; 3]);
        let loss = tch::no_grad(|| in_batch_softmax_loss(&model, &b, true)).double_value(&[]);
        // Recompute without the helper: eval-mode forward equals train mode with dropout 0.
        let iv = model.encode_items(&b.items, false);
        let uv = model.encode_users(&b.parts[0].users, &iv, false);
        let logits = model.logits(&uv, &iv.narrow(0, 0, 3));
        let expected = -logits
            .log_softmax(-1, Kind::Float)
            .diagonal(0, 0, 1)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn a_seen_candidate_drops_out_of_its_own_rows_softmax_only() {
        tch::manual_seed(5);
        let cfg = cfg();
        let model = TwoTower::new(cfg.clone(), Device::Cpu).unwrap();
        let mut b = batch(&cfg, &[0, 1, 2], vec![0.0; 3]);
        // Row 0's user saw item 2 before its target (flat position 0 · 3 + 2).
        b.layout.seen_candidates = Tensor::from_slice(&[2i64]);
        let loss = tch::no_grad(|| in_batch_softmax_loss(&model, &b, true)).double_value(&[]);
        let iv = model.encode_items(&b.items, false);
        let uv = model.encode_users(&b.parts[0].users, &iv, false);
        let logits = model.logits(&uv, &iv.narrow(0, 0, 3));
        let row0 = logits.get(0).narrow(0, 0, 2).log_softmax(-1, Kind::Float);
        let rest = logits.narrow(0, 1, 2).log_softmax(-1, Kind::Float);
        let expected =
            -(row0.double_value(&[0]) + rest.double_value(&[0, 1]) + rest.double_value(&[1, 2]))
                / 3.0;
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn content_alignment_trains_the_content_path_and_leaves_the_ids_alone() {
        tch::manual_seed(6);
        let cfg = TowerConfig {
            item_id_dim: 4,
            item_id_dropout: 0.0,
            ..cfg()
        };
        let model = TwoTower::new(cfg.clone(), Device::Cpu).unwrap();
        let mut b = batch(&cfg, &[0, 1, 2], vec![0.0; 3]);
        // None of these items was seen in training: their content vector is their only one.
        let nothing = content_alignment_loss(&model, &b).double_value(&[]);
        assert!(nothing.abs() < 1e-6, "{nothing}");
        b.items.ids = Tensor::from_slice(&[1i64, 2, 3, 0]);
        let loss = content_alignment_loss(&model, &b);
        assert!(loss.double_value(&[]) > 1e-4);
        loss.backward();
        let grad_sum = |name: &str| {
            let vars = model.vs.variables();
            let g = vars[name].grad();
            if g.defined() {
                g.abs().sum(Kind::Float).double_value(&[])
            } else {
                0.0
            }
        };
        // The full vector is the target, held fixed: the ids get no gradient from it.
        assert_eq!(grad_sum("item.id_emb.weight"), 0.0);
        assert!(grad_sum("item.category_emb.weight") > 0.0);
    }

    #[test]
    fn accidental_hits_are_masked_and_logq_lowers_popular_candidates() {
        tch::manual_seed(4);
        let cfg = cfg();
        let model = TwoTower::new(cfg.clone(), Device::Cpu).unwrap();
        // Rows 0 and 1 share a positive: with hit removal neither counts the other as a negative.
        let dup = batch(&cfg, &[0, 0, 1], vec![0.0; 3]);
        let with = tch::no_grad(|| in_batch_softmax_loss(&model, &dup, true)).double_value(&[]);
        let without = tch::no_grad(|| in_batch_softmax_loss(&model, &dup, false)).double_value(&[]);
        assert!(with < without, "{with} !< {without}");
        // A large log q on a candidate makes it a weaker negative for everyone else.
        let plain = batch(&cfg, &[0, 1, 2], vec![0.0, 0.0, 0.0]);
        let corrected = batch(&cfg, &[0, 1, 2], vec![0.0, 0.0, 5.0]);
        let a = tch::no_grad(|| in_batch_softmax_loss(&model, &plain, true)).double_value(&[]);
        let b = tch::no_grad(|| in_batch_softmax_loss(&model, &corrected, true)).double_value(&[]);
        assert!(a.is_finite() && b.is_finite() && a != b);
    }
}
