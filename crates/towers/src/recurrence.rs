//! The user tower's GRU recurrence on the CPU, for training and inference alike.
//!
//! libtorch's CPU GRU runs every row of a batch for every step, padding included, and the tower
//! reads only each row's state after its last real event. Here rows run longest history first
//! and step `t` runs only the rows that have more than `t` events (a packed sequence), and the
//! result is that last state alone. The caller hands over the input gates (`x·W_ihᵀ + b_ih` for
//! every event) so that it can make them without a product per event (`user.rs` projects each
//! distinct item once). The equations and the weights are `torch.nn.GRU`'s (gate order r, z, n).
//!
//! With gradients each step is a handful of libtorch operations that autograd differentiates,
//! or, inside [`bptt::recording`](crate::bptt::recording), a taped forward whose backward is
//! written out (`bptt.rs`).
//! Without, on the CPU, each step is one hidden product and one fused pass over the rows
//! (`gru_step.rs`). Small batches (serving's one to a few users) take their hidden products
//! from a blocked kernel instead of BLAS, whose `addmm` packs all of `W_hh` on every step, and
//! read the weights in place. Tests hold all of them equal to libtorch's GRU, values and
//! gradients.

use tch::{Device, Kind, Tensor};

use crate::gru_step;

/// The GRU's parameters (`weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`), shared
/// with the var store: loading weights updates them.
#[derive(Debug)]
pub struct GruWeights {
    pub w_ih: Tensor,
    pub w_hh: Tensor,
    pub b_ih: Tensor,
    pub b_hh: Tensor,
}

impl GruWeights {
    /// The weights of a single-layer GRU created under `p`, or `None` when they are not there.
    pub fn of(p: &tch::nn::Path) -> Option<GruWeights> {
        Some(GruWeights {
            w_ih: p.get("weight_ih_l0")?,
            w_hh: p.get("weight_hh_l0")?,
            b_ih: p.get("bias_ih_l0")?,
            b_hh: p.get("bias_hh_l0")?,
        })
    }

    fn hidden(&self) -> i64 {
        self.w_hh.size()[1]
    }
}

/// The order the recurrence runs a batch in: rows longest history first (stable), step by step.
#[derive(Debug, Clone, PartialEq)]
pub struct Packing {
    /// Each row's position in the longest-first order.
    pub rank: Vec<i64>,
    /// For each step `t`, how many rows have more than `t` events: the first that many rows of
    /// the longest-first order run at step `t`.
    pub running: Vec<i64>,
    /// The real events as positions in the flattened `[B · L]` history: step 0's rows in
    /// longest-first order, then step 1's, and so on.
    pub events: Vec<i64>,
}

impl Packing {
    /// The packing of rows with these history lengths, right-padded to `steps` events.
    pub fn of(lengths: &[i64], steps: i64) -> Packing {
        let mut order: Vec<i64> = (0..lengths.len() as i64).collect();
        order.sort_by_key(|&r| std::cmp::Reverse(lengths[r as usize]));
        let mut rank = vec![0i64; lengths.len()];
        for (at, &row) in order.iter().enumerate() {
            rank[row as usize] = at as i64;
        }
        let running: Vec<i64> = (0..steps)
            .map(|t| lengths.iter().filter(|&&n| n > t).count() as i64)
            .collect();
        let events = (0..steps)
            .flat_map(|t| {
                let rows = &order[..running[t as usize] as usize];
                rows.iter().map(move |&row| row * steps + t)
            })
            .collect();
        Packing {
            rank,
            running,
            events,
        }
    }
}

/// Batches up to this size take the plain loops when no gradient is wanted. For 20 steps of a
/// 128-wide GRU on a Zen 3 core they take 0.07 ms for one user, 0.14 ms for three and 1.0 ms
/// for 24, against 0.22, 0.46 and 1.5 ms through a BLAS product per step; BLAS pulls ahead
/// from about 32 rows (`docs/benchmarks.md`, session 29).
pub const MAX_LOOP_BATCH: i64 = 24;

/// Each row's state after its last event (`[B, H]`, zeros for a row without events), rows in run
/// order: longest history first.
///
/// `running[t]` is how many rows have more than `t` events, so the rows step `t` runs are the
/// first `running[t]`; it is non-increasing, one entry per step. `gates` (`[Σ running, 3H]`) are
/// the input gates of those events, packed: step 0's rows in run order, then step 1's, and so
/// on. `b` is the number of rows, those without events included.
pub fn last_states(gates: &Tensor, running: &[i64], b: i64, w: &GruWeights) -> Tensor {
    let hidden = w.hidden();
    let on = (Kind::Float, gates.device());
    let first = running.first().copied().unwrap_or(0);
    if first == 0 {
        return Tensor::zeros([b, hidden], on);
    }
    if gates.device() == Device::Cpu && crate::bptt::is_recording() {
        return crate::bptt::record(gates, running, b, w);
    }
    if !gates.requires_grad() && gates.device() == Device::Cpu {
        if b <= MAX_LOOP_BATCH {
            if let Some(states) = loop_states(gates, running, b, w) {
                return states;
            }
        }
        return crate::bptt::forward(gates, running, b, w).0;
    }
    let w_hh = w.w_hh.tr();
    let mut h = Tensor::zeros([first, hidden], on);
    // One split, not a slice per step: autograd then gathers the steps' gradients in one copy
    // rather than adding a zero-filled `[E, 3H]` per step.
    let steps = gates.split_with_sizes(running, 0);
    // The rows that finish at each step; latest first once reversed, which is run order.
    let mut finished = Vec::with_capacity(running.len() + 1);
    for (t, (gi, &n)) in steps.iter().zip(running).enumerate() {
        if n == 0 {
            break;
        }
        let h_prev = h.narrow(0, 0, n);
        let gh = w.b_hh.addmm(&h_prev, &w_hh);
        let rz = (gi.narrow(1, 0, 2 * hidden) + gh.narrow(1, 0, 2 * hidden)).sigmoid();
        let (r, z) = (rz.narrow(1, 0, hidden), rz.narrow(1, hidden, hidden));
        let n_gate =
            (gi.narrow(1, 2 * hidden, hidden) + r * gh.narrow(1, 2 * hidden, hidden)).tanh();
        h = &n_gate + z * (h_prev - &n_gate);
        let next = running.get(t + 1).copied().unwrap_or(0);
        if next < n {
            finished.push(h.narrow(0, next, n - next));
        }
    }
    finished.reverse();
    if first < b {
        finished.push(Tensor::zeros([b - first, hidden], on));
    }
    Tensor::cat(&finished, 0)
}

/// [`last_states`] as plain loops, for small batches without gradients; `None` where the
/// tensors are not what the loops read (then libtorch operations run instead). Each step is
/// [`gru_step::hidden_products`] and [`gru_step::forward`] over the rows still running, which
/// are the first ones: a row's state stays where it is once its history ends.
fn loop_states(gates: &Tensor, running: &[i64], b: i64, w: &GruWeights) -> Option<Tensor> {
    let hidden = w.hidden() as usize;
    let events: i64 = running.iter().sum();
    if gates.size() != [events, 3 * hidden as i64] {
        return None;
    }
    let gates = gates.contiguous();
    let (gi, w_hh, b_hh) = (floats(&gates)?, floats(&w.w_hh)?, floats(&w.b_hh)?);
    if w_hh.len() != 3 * hidden * hidden || b_hh.len() != 3 * hidden {
        return None;
    }
    let first = running.first().copied().unwrap_or(0) as usize;
    let mut states = vec![0f32; b as usize * hidden];
    let mut gh = vec![0f32; first * 3 * hidden];
    let (mut rz, mut n_gate, mut h_prev) = (
        vec![0f32; first * 2 * hidden],
        vec![0f32; first * hidden],
        vec![0f32; first * hidden],
    );
    let mut start = 0;
    for &n in running {
        let n = n as usize;
        if n == 0 {
            break;
        }
        let h = &mut states[..n * hidden];
        h_prev[..n * hidden].copy_from_slice(h);
        let h_prev = &h_prev[..n * hidden];
        let gh = &mut gh[..n * 3 * hidden];
        gru_step::hidden_products(hidden, w_hh, b_hh, h_prev, gh);
        let gi = &gi[start * 3 * hidden..(start + n) * 3 * hidden];
        let (rz, n_gate) = (&mut rz[..n * 2 * hidden], &mut n_gate[..n * hidden]);
        gru_step::forward(hidden, gi, gh, h_prev, rz, n_gate, h, &mut []);
        start += n;
    }
    Some(Tensor::from_slice(&states).view([b, hidden as i64]))
}

/// The floats of a contiguous float tensor on the CPU, read in place; `None` for any other.
fn floats(t: &Tensor) -> Option<&[f32]> {
    if t.device() != Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() {
        return None;
    }
    if t.numel() == 0 {
        return Some(&[]);
    }
    // SAFETY: a contiguous float tensor on the CPU holds `numel` floats from `data_ptr`; the
    // borrow of `t` keeps its storage alive, and nothing writes a model's weights or these
    // gates while a forward pass without gradients reads them.
    Some(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, RNN};

    /// Rows of `[B, L, I]` inputs with these lengths, libtorch's GRU over them read at each
    /// row's last event (zeros without one), and the same through [`last_states`].
    fn both(
        lens: &[i64],
        input: i64,
        hidden: i64,
        grad: bool,
    ) -> (Tensor, Tensor, Tensor, GruWeights) {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = nn::RNNConfig {
            batch_first: true,
            ..Default::default()
        };
        let gru = nn::gru(vs.root() / "gru", input, hidden, cfg);
        let w = GruWeights::of(&(vs.root() / "gru")).unwrap();
        let (b, l) = (lens.len() as i64, *lens.iter().max().unwrap());
        let x = Tensor::randn([b, l, input], (Kind::Float, Device::Cpu)).set_requires_grad(grad);
        let len = Tensor::from_slice(lens);
        let out = gru.seq(&x).0;
        let last = (&len - 1)
            .clamp_min(0)
            .view([b, 1, 1])
            .expand([b, 1, hidden], false);
        let expected = out.gather(1, &last, false).squeeze_dim(1) * len.gt(0).unsqueeze(-1);
        let packing = Packing::of(lens, l);
        let gates = (x.matmul(&w.w_ih.tr()) + &w.b_ih)
            .flatten(0, 1)
            .index_select(0, &Tensor::from_slice(&packing.events));
        let sorted = last_states(&gates, &packing.running, b, &w);
        let got = sorted.index_select(0, &Tensor::from_slice(&packing.rank));
        (expected, got, x, w)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn packed_last_states_equal_libtorchs_gru_with_gradients() {
        tch::manual_seed(7);
        let lens = [3, 0, 7, 1, 7, 4, 2, 0, 5];
        let (expected, got, x, w) = both(&lens, 12, 20, true);
        assert_eq!(got.size(), [9, 20]);
        assert!(max_diff(&expected, &got) < 1e-5);
        let probe = Tensor::randn([9, 20], (Kind::Float, Device::Cpu));
        let wrt = [&x, &w.w_ih, &w.w_hh, &w.b_ih, &w.b_hh];
        let grads = |out: &Tensor| {
            Tensor::run_backward(&[(out * &probe).sum(Kind::Float)], &wrt, true, false)
        };
        for (i, (e, g)) in grads(&expected).iter().zip(grads(&got)).enumerate() {
            assert!(
                max_diff(e, &g) < 1e-5,
                "gradient {i} differs by {}",
                max_diff(e, &g)
            );
        }
    }

    #[test]
    fn without_gradients_the_loop_and_the_fused_steps_equal_libtorchs_gru() {
        tch::manual_seed(8);
        let many: Vec<i64> = (0..3 * MAX_LOOP_BATCH).map(|i| (i * 7) % 12).collect();
        for lens in [
            vec![1],
            vec![3, 7, 2],
            vec![20; MAX_LOOP_BATCH as usize],
            vec![0, 5, 0],
            (0..MAX_LOOP_BATCH).map(|i| (i * 5) % 9).collect(),
            many,
        ] {
            let (expected, got) = tch::no_grad(|| {
                let (e, g, _, _) = both(&lens, 12, 20, false);
                (e, g)
            });
            assert!(max_diff(&expected, &got) < 1e-5, "{lens:?}");
        }
    }

    #[test]
    fn packing_runs_the_longest_rows_first_and_skips_padding() {
        let p = Packing::of(&[1, 3, 0, 3], 3);
        assert_eq!(p.rank, [2, 0, 3, 1]);
        assert_eq!(p.running, [3, 2, 2]);
        // Step 0: rows 1, 3, 0; steps 1 and 2: rows 1 and 3 (row-major positions in [4 · 3]).
        assert_eq!(p.events, [3, 9, 0, 4, 10, 5, 11]);
    }

    #[test]
    fn a_batch_without_events_gives_zeros() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _gru = nn::gru(vs.root() / "gru", 4, 6, Default::default());
        let w = GruWeights::of(&(vs.root() / "gru")).unwrap();
        let gates = Tensor::zeros([0, 18], (Kind::Float, Device::Cpu));
        let states = last_states(&gates, &[0, 0], 3, &w);
        assert_eq!(states.size(), [3, 6]);
        assert_eq!(states.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
