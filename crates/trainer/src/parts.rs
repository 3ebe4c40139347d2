//! A CPU training step in parts: data parallelism inside one batch.
//!
//! The towers' operations are small (a few hundred users, a GRU step over a few hundred rows),
//! and splitting each of them over libtorch's intra-op threads costs more in waking OpenMP
//! teams and OpenBLAS's pool than it saves (`docs/benchmarks.md`, session 27). Here each
//! thread instead runs whole parts of the batch, forward and backward, on one core each, and
//! the graph is cut where the parts meet, so that each thread backpropagates only its own:
//!
//! 1. the item tower encodes the batch's distinct items in `P` contiguous chunks, one per
//!    thread; their vectors are joined, as plain values, into the batch's item vectors;
//! 2. the user tower encodes the batch's rows in `P` parts, each from leaves holding the item
//!    vectors its histories point at and the batch's candidates; each part computes the
//!    in-batch softmax of its own rows against every candidate (its share of the loss of
//!    [`in_batch_softmax_loss`]) and backpropagates it at once, its GRU through a hand-written
//!    backward (`towers::bptt`), down to its leaves;
//! 3. the leaves' gradients are added into the gradient of the batch's item vectors, and each
//!    item chunk backpropagates its rows of it.
//!
//! Every gradient is summed in a fixed order, so the result never depends on which thread
//! finished first. The loss and its gradients are the whole batch's, as in one part, up to the
//! order of float sums. Each chunk and part draws its dropout masks from its own generator,
//! seeded from the run's seed, the step and its index (`towers::noise`), so a run follows its
//! seed on any number of cores.
//!
//! [`in_batch_softmax_loss`]: crate::loss::in_batch_softmax_loss

use tch::{Kind, Tensor};
use towers::bptt::{recording, Recorded};
use towers::{ItemInputs, TwoTower};

use crate::batches::part_range;
use crate::loss::{alignment_sum, softmax_rows, DeviceBatch};
use crate::threads::on_threads;

/// What a step minimises, besides the batch itself.
#[derive(Debug, Clone, Copy)]
pub struct Objective {
    pub remove_accidental_hits: bool,
    /// Weight of the content-alignment term (0: none).
    pub content_alignment: f64,
}

/// The model, shared by the part threads.
struct Shared<'a>(&'a TwoTower);

// SAFETY: the part threads run forward and backward passes, which only read the parameters: the
// backward returns gradients (`run_backward` with inputs) instead of accumulating them into the
// variables. Reading a tensor is thread-safe in libtorch, and so is recording autograd edges to a
// shared leaf (its gradient accumulator is created under the variable's lock). Nothing writes
// the parameters until every part thread has been joined: the optimizer runs after `gradients`
// returns.
unsafe impl Sync for Shared<'_> {}

impl Shared<'_> {
    /// The model (a method, so that closures capture the whole `Shared`, not its field).
    fn model(&self) -> &TwoTower {
        self.0
    }
}

/// The seed of the dropout masks of chunk or part `index` at optimizer step `step` of a run
/// seeded `seed` (item chunks are `0..P`, user parts `P..2P`).
pub fn part_seed(seed: u64, step: u64, index: usize) -> u64 {
    seed.rotate_left(40) ^ step.wrapping_mul(1024) ^ index as u64
}

/// Adds `g` into `total` (undefined: none yet, or none to add).
fn add_into(total: &mut Tensor, g: Tensor) {
    if g.defined() {
        *total = tch::no_grad(|| if total.defined() { &*total + g } else { g });
    }
}

/// Adds `part`'s gradients into `total`, variable by variable.
fn accumulate(total: &mut [Tensor], part: Vec<Tensor>) {
    for (t, g) in total.iter_mut().zip(part) {
        add_into(t, g);
    }
}

/// The gradients of `leaves` and of `params` from `root`, a loss over a user part's rows. The
/// part's recurrences ran taped (`recorded`), so autograd stops at their states: the backward
/// goes down to them (and to everything else below the loss), through each recurrence's tape,
/// then from its input gates down.
fn user_backward(
    root: &Tensor,
    leaves: &[&Tensor],
    recorded: &[Recorded],
    params: &[Tensor],
) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut inputs: Vec<&Tensor> = leaves.to_vec();
    inputs.extend(recorded.iter().map(|r| &r.states));
    inputs.extend(params);
    // The graph is kept: a search's projected query feeds both the events' contents (reached
    // now) and the input gates (reached below).
    let mut grads = Tensor::run_backward(&[root], &inputs, true, false);
    let mut d_leaves: Vec<Tensor> = grads.drain(..leaves.len()).collect();
    let d_states: Vec<Tensor> = grads.drain(..recorded.len()).collect();
    let mut below: Option<Tensor> = None;
    for (r, d_states) in recorded.iter().zip(d_states) {
        if !d_states.defined() {
            continue;
        }
        let taped = r.tape.backward(&d_states);
        for (weight, g) in [(&r.tape.w_hh, taped.w_hh), (&r.tape.b_hh, taped.b_hh)] {
            if let Some(i) = params
                .iter()
                .position(|p| p.data_ptr() == weight.data_ptr())
            {
                add_into(&mut grads[i], g);
            }
        }
        // A scalar whose gradient with respect to the input gates is the tape's: one dot
        // product forward, one scaled copy backward.
        let term = r.gates.flatten(0, -1).dot(&taped.gates.flatten(0, -1));
        below = Some(match below {
            Some(b) => b + term,
            None => term,
        });
    }
    if let Some(below) = below {
        let mut inputs: Vec<&Tensor> = leaves.to_vec();
        inputs.extend(params);
        let mut more = Tensor::run_backward(&[&below], &inputs, false, false);
        let more_leaves: Vec<Tensor> = more.drain(..leaves.len()).collect();
        accumulate(&mut d_leaves, more_leaves);
        accumulate(&mut grads, more);
    }
    (d_leaves, grads)
}

/// What a user part's thread returns: its share of the loss, the gradients of its items and of
/// the batch's candidates, and its parameters' gradients.
struct UserPartGrads {
    loss: Tensor,
    d_own: Tensor,
    d_candidates: Tensor,
    params: Vec<Tensor>,
}

/// The loss of `batch` (detached) and the gradient of each of `params` (undefined for those
/// the batch does not reach), computed in parts on up to `threads` threads. `seed` and `step`
/// seed the parts' dropout masks ([`part_seed`]). Run it with one libtorch thread and one
/// OpenBLAS thread ([`Session::step`] does), or the parts' threads share pools that serialise
/// them.
///
/// [`Session::step`]: crate::session::Session::step
pub fn gradients(
    model: &TwoTower,
    params: &[Tensor],
    batch: DeviceBatch,
    objective: Objective,
    (seed, step): (u64, u64),
    threads: usize,
) -> (Tensor, Vec<Tensor>) {
    let DeviceBatch {
        items,
        parts,
        candidates,
        layout,
    } = batch;
    let n_parts = parts.len();
    let n_items = items.len();
    let alignment = objective.content_alignment;
    let per_item = alignment / n_items.max(1) as f64;
    let shared = Shared(model);
    let shared = &shared;
    let clones = || params.iter().map(Tensor::shallow_clone).collect::<Vec<_>>();

    // 1. The item tower, in chunks.
    let chunks: Vec<(i64, i64)> = (0..n_parts)
        .map(|k| part_range(n_items as usize, n_parts, k))
        .filter(|r| !r.is_empty())
        .map(|r| (r.start as i64, r.len() as i64))
        .collect();
    let inputs: Vec<ItemInputs> = chunks.iter().map(|&(s, l)| items.rows(s, l)).collect();
    let encoded_items: Vec<(Tensor, Option<Tensor>)> = on_threads(inputs, threads, |k, chunk| {
        towers::noise::seeded(part_seed(seed, step, k), || {
            let model = shared.model();
            let vecs = model.encode_items(&chunk, true);
            (
                vecs,
                (alignment > 0.0).then(|| alignment_sum(model, &chunk)),
            )
        })
    });
    let item_vecs = tch::no_grad(|| {
        let vecs: Vec<&Tensor> = encoded_items.iter().map(|(v, _)| v).collect();
        Tensor::cat(&vecs, 0)
    });

    // 2. The user tower and the softmax over each part's rows, forward and backward, on leaves
    //    for the part's items and the batch's candidates.
    let item_rows: Vec<Option<Tensor>> = parts
        .iter()
        .map(|p| p.item_rows.as_ref().map(Tensor::shallow_clone))
        .collect();
    let candidate_vecs = item_vecs.index_select(0, &candidates);
    let mut first = 0;
    let work: Vec<_> = parts
        .into_iter()
        .map(|p| {
            let own = p.own_items(&item_vecs).detach().set_requires_grad(true);
            let cands = candidate_vecs.detach().set_requires_grad(true);
            let at = first;
            first += p.rows;
            (p, at, own, cands, layout.shallow_clone(), clones())
        })
        .collect();
    let hits = objective.remove_accidental_hits;
    let user_grads = on_threads(
        work,
        threads,
        |k, (part, at, own, cands, layout, params)| {
            towers::noise::seeded(part_seed(seed, step, n_parts + k), || {
                let model = shared.model();
                let (users, recorded) = recording(|| part.encode(model, &own));
                let loss = softmax_rows(model, &users, &cands, &layout, at, hits);
                let (mut d, params) = user_backward(&loss, &[&own, &cands], &recorded, &params);
                let d_candidates = d.pop().expect("a gradient per leaf");
                let d_own = d.pop().expect("a gradient per leaf");
                UserPartGrads {
                    loss: loss.detach(),
                    d_own,
                    d_candidates,
                    params,
                }
            })
        },
    );

    // The parts' losses and gradients, summed in part order.
    let mut loss = Tensor::zeros([], (Kind::Float, item_vecs.device()));
    let mut grads: Vec<Tensor> = params.iter().map(|_| Tensor::new()).collect();
    let mut d_items = item_vecs.zeros_like();
    tch::no_grad(|| {
        for (g, rows) in user_grads.into_iter().zip(&item_rows) {
            loss += g.loss;
            accumulate(&mut grads, g.params);
            if g.d_candidates.defined() {
                let _ = d_items.index_add_(0, &candidates, &g.d_candidates);
            }
            if g.d_own.defined() {
                match rows {
                    Some(rows) => {
                        let _ = d_items.index_add_(0, rows, &g.d_own);
                    }
                    None => d_items += &g.d_own,
                }
            }
        }
        for a in encoded_items.iter().filter_map(|(_, a)| a.as_ref()) {
            loss += a.detach() * per_item;
        }
    });

    // 3. Each item chunk's backward.
    let work: Vec<_> = encoded_items
        .into_iter()
        .zip(&chunks)
        .map(|((vecs, a), &(s, l))| (vecs, a, d_items.narrow(0, s, l), clones()))
        .collect();
    let item_grads = on_threads(work, threads, |_, (vecs, a, d, params)| {
        let mut root = (&vecs * d).sum(Kind::Float);
        if let Some(a) = a {
            root += a * per_item;
        }
        Tensor::run_backward(&[&root], &params, false, false)
    });
    for g in item_grads {
        accumulate(&mut grads, g);
    }
    (loss, grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batches::{HostBatch, UserPart};
    use crate::loss::{content_alignment_loss, in_batch_softmax_loss};
    use tch::Device;
    use towers::inputs::ItemTokens;
    use towers::{EventInput, ItemBatchHost, TowerConfig, UserBatchHost, UserInput, VocabSizes};

    fn cfg() -> TowerConfig {
        TowerConfig {
            dim: 8,
            token_dim: 8,
            gru_hidden: 8,
            dropout: 0.0,
            item_id_dim: 4,
            item_id_dropout: 0.0,
            vocab: VocabSizes {
                title: 12,
                aspects: 12,
                categories: 12,
                user_features: 4,
                item_ids: 10,
                title_buckets: 0,
            },
            ..Default::default()
        }
    }

    /// Users `u` (0..6) with target item `u + 1` and a history of items `u` and `u + 2` (and a
    /// search for users 0 and 3), in `parts` contiguous parts, with 3 extra negatives (items 7,
    /// 8, 1).
    fn batch(cfg: &TowerConfig, parts: usize) -> HostBatch {
        let tokens: Vec<ItemTokens> = (0..10)
            .map(|i| ItemTokens {
                title: vec![i + 1],
                aspects: vec![i % 5 + 1],
                categories: vec![i % 3 + 1],
                id: i + 1,
            })
            .collect();
        let b = 6usize;
        let negatives = [7i64, 8, 1];
        let mut items: Vec<i64> = Vec::new();
        let row_of = |i: i64, items: &mut Vec<i64>| match items.iter().position(|&x| x == i) {
            Some(r) => r as i64,
            None => {
                items.push(i);
                items.len() as i64 - 1
            }
        };
        let mut candidates = Vec::new();
        let mut users = Vec::new();
        for u in 0..b as i64 {
            candidates.push(row_of(u + 1, &mut items));
            let mut history: Vec<EventInput> = [u, u + 2]
                .iter()
                .map(|&i| EventInput {
                    event_type: 1,
                    item_row: Some(row_of(i, &mut items)),
                    query: vec![],
                    gap_s: 60,
                })
                .collect();
            if u % 3 == 0 {
                // A search: its projected query feeds the content and the input gates alike.
                history.push(EventInput {
                    event_type: 2,
                    item_row: None,
                    query: vec![u + 1, 3],
                    gap_s: 30,
                });
            }
            users.push(UserInput {
                history,
                ..Default::default()
            });
        }
        for n in negatives {
            candidates.push(row_of(n, &mut items));
        }
        let user_parts = (0..parts)
            .map(|k| {
                let mut part: Vec<UserInput> = users[part_range(b, parts, k)].to_vec();
                if parts == 1 {
                    return UserPart {
                        users: UserBatchHost::new(&part, cfg),
                        item_rows: None,
                        rows: part.len(),
                    };
                }
                let mut table: Vec<i64> = Vec::new();
                for e in part.iter_mut().flat_map(|u| u.history.iter_mut()) {
                    e.item_row = e.item_row.map(|row| row_of(row, &mut table));
                }
                UserPart {
                    users: UserBatchHost::new(&part, cfg),
                    item_rows: Some(table),
                    rows: part.len(),
                }
            })
            .collect();
        let refs: Vec<&ItemTokens> = items.iter().map(|&i| &tokens[i as usize]).collect();
        let catalog_rows: Vec<i64> = (1..=b as i64).chain(negatives).collect();
        HostBatch {
            items: ItemBatchHost::new(&refs, cfg),
            parts: user_parts,
            candidates,
            candidate_log_q: (0..catalog_rows.len()).map(|c| c as f32 * 0.1).collect(),
            candidate_catalog_rows: catalog_rows,
            // Row 2's user saw candidate 4's item before.
            seen_candidates: vec![2 * 9 + 4],
            size: b,
        }
    }

    /// A model seeded `seed` and its trainable variables.
    fn model(cfg: &TowerConfig, seed: i64) -> (TwoTower, Vec<Tensor>) {
        tch::manual_seed(seed);
        let model = TwoTower::new(cfg.clone(), Device::Cpu).unwrap();
        let params = model
            .vs
            .trainable_variables()
            .iter()
            .map(Tensor::shallow_clone)
            .collect();
        (model, params)
    }

    #[test]
    fn a_batch_in_parts_has_the_loss_and_gradients_of_the_whole_batch() {
        let cfg = cfg();
        let (model, params) = model(&cfg, 11);
        let objective = Objective {
            remove_accidental_hits: true,
            content_alignment: 0.3,
        };
        let whole = DeviceBatch::new(&batch(&cfg, 1), Device::Cpu);
        let loss = in_batch_softmax_loss(&model, &whole, true)
            + content_alignment_loss(&model, &whole) * 0.3;
        let expected = Tensor::run_backward(&[&loss], &params, false, false);
        for (parts, threads) in [(2, 2), (3, 2), (3, 1), (6, 4)] {
            let split = DeviceBatch::new(&batch(&cfg, parts), Device::Cpu);
            let (got_loss, got) = gradients(&model, &params, split, objective, (1, 1), threads);
            let (a, b) = (loss.double_value(&[]), got_loss.double_value(&[]));
            assert!((a - b).abs() < 1e-5, "{parts} parts: loss {b} vs {a}");
            for (i, (e, g)) in expected.iter().zip(&got).enumerate() {
                assert_eq!(e.defined(), g.defined(), "{parts} parts, parameter {i}");
                if e.defined() {
                    // Sums in another order: equal to float rounding, relative to the size.
                    let diff = (e - g).abs().max().double_value(&[]);
                    let size = e.abs().max().double_value(&[]).max(1.0);
                    assert!(
                        diff < 1e-5 * size,
                        "{parts} parts, parameter {i}: off by {diff}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_run_in_parts_follows_its_seed() {
        let cfg = TowerConfig {
            dropout: 0.3,
            item_id_dropout: 0.5,
            ..cfg()
        };
        let (model, params) = model(&cfg, 2);
        let objective = Objective {
            remove_accidental_hits: true,
            content_alignment: 0.0,
        };
        let run = |seed: u64| {
            let split = DeviceBatch::new(&batch(&cfg, 2), Device::Cpu);
            gradients(&model, &params, split, objective, (seed, 5), 2)
        };
        let (loss_a, a) = run(9);
        let (loss_b, b) = run(9);
        assert!(loss_a.equal(&loss_b));
        for (x, y) in a.iter().zip(&b) {
            assert!(!x.defined() || x.equal(y));
        }
        let (loss_c, _) = run(10);
        assert!(!loss_a.equal(&loss_c), "another seed draws other masks");
    }
}
