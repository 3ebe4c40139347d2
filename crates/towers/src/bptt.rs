//! The GRU recurrence with a hand-written backward (backpropagation through time), for training
//! in parts on the CPU (`trainer::parts`). Its forward is also the CPU recurrence without
//! gradients for batches past the serving loop's size (`recurrence::last_states`).
//!
//! Under autograd each step of [`recurrence::last_states`] records a dozen nodes, and their
//! backward materialises a zero-filled gradient for every slice it took (`r`, `z` and `n` are
//! slices of the gates), then adds a small product per step to `W_hh`'s gradient. Here the
//! forward runs without autograd and keeps what the backward needs (each event's previous state,
//! gates and hidden products, `[E, ·]` buffers in packed order). Each step is one hidden
//! product and one fused pass over its rows (`gru_step.rs`), forward and backward;
//! [`Tape::backward`] runs the steps in reverse, writing each step's gradients in place, and
//! forms `W_hh`'s gradient as one product over all events.
//!
//! The recurrence is cut out of the autograd graph: inside [`recording`], the states come back
//! as a leaf, and the caller backpropagates in three passes (`trainer::parts`): to the states
//! (and everything else above them), through the [`Tape`], then from the input gates down.
//!
//! [`recurrence::last_states`]: crate::recurrence::last_states

use std::cell::RefCell;

use tch::{Device, Kind, Tensor};

use crate::gru_step;
use crate::recurrence::GruWeights;

/// What [`Tape::backward`] needs of one recurrence's forward.
#[derive(Debug)]
pub struct Tape {
    running: Vec<i64>,
    /// `[E, H]` each event's state before its step, packed as the gates are.
    h_prev: Tensor,
    /// `[E, 3H]` each event's `h_prev · W_hhᵀ + b_hh`.
    gh: Tensor,
    /// `[E, 2H]` each event's reset and update gates (after the sigmoid).
    rz: Tensor,
    /// `[E, H]` each event's candidate state (after the tanh).
    n: Tensor,
    /// `W_hh` and `b_hh` (the variables themselves: the caller finds their gradients' slots).
    pub w_hh: Tensor,
    pub b_hh: Tensor,
}

/// The gradients [`Tape::backward`] gives.
#[derive(Debug)]
pub struct TapeGrads {
    /// `[E, 3H]` of the input gates, packed as they were passed in.
    pub gates: Tensor,
    /// `[3H, H]` of `W_hh`.
    pub w_hh: Tensor,
    /// `[3H]` of `b_hh`.
    pub b_hh: Tensor,
}

/// One recurrence run inside [`recording`]: its input gates (still in the caller's graph), its
/// states (a leaf standing for them) and its tape.
#[derive(Debug)]
pub struct Recorded {
    pub gates: Tensor,
    pub states: Tensor,
    pub tape: Tape,
}

thread_local! {
    static RECORDER: RefCell<Option<Vec<Recorded>>> = const { RefCell::new(None) };
}

/// Runs `f` with the CPU recurrences on this thread taped instead of recorded by autograd;
/// returns its result and the recurrences it ran, in order.
pub fn recording<T>(f: impl FnOnce() -> T) -> (T, Vec<Recorded>) {
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            RECORDER.with(|r| r.borrow_mut().take());
        }
    }
    RECORDER.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let stop = Stop;
    let out = f();
    let recorded = RECORDER.with(|r| r.borrow_mut().take()).unwrap_or_default();
    drop(stop);
    (out, recorded)
}

/// Whether this thread is inside [`recording`].
pub(crate) fn is_recording() -> bool {
    RECORDER.with(|r| r.borrow().is_some())
}

/// [`recurrence::last_states`](crate::recurrence::last_states) inside [`recording`]: the
/// states as a new leaf, with the gates and the tape kept for the caller's backward.
pub(crate) fn record(gates: &Tensor, running: &[i64], b: i64, w: &GruWeights) -> Tensor {
    let (states, tape) = forward(gates, running, b, w);
    let states = states.set_requires_grad(true);
    RECORDER.with(|r| {
        if let Some(recorded) = r.borrow_mut().as_mut() {
            recorded.push(Recorded {
                gates: gates.shallow_clone(),
                states: states.shallow_clone(),
                tape,
            });
        }
    });
    states
}

/// Each row's state after its last event (`[B, H]`, run order, zeros for rows without events),
/// as `recurrence::last_states` computes it, and the tape of the run; no autograd. CPU only.
pub fn forward(gates: &Tensor, running: &[i64], b: i64, w: &GruWeights) -> (Tensor, Tape) {
    tch::no_grad(|| {
        let hidden = w.w_hh.size()[1];
        let on = (Kind::Float, Device::Cpu);
        let gates = gates.detach().to_kind(Kind::Float).contiguous();
        assert_eq!(gates.device(), Device::Cpu, "the taped GRU runs on the CPU");
        let events = gates.size()[0];
        let w_hh_t = w.w_hh.detach().tr();
        let b_hh = w.b_hh.detach();
        let h_prev = Tensor::zeros([events, hidden], on);
        let gh = Tensor::empty([events, 3 * hidden], on);
        let rz = Tensor::empty([events, 2 * hidden], on);
        let n_gate = Tensor::empty([events, hidden], on);
        let out = Tensor::zeros([b, hidden], on);
        let (hidden, mut start) = (hidden as usize, 0usize);
        for (t, &n) in running.iter().enumerate() {
            if n == 0 {
                break;
            }
            let next = running.get(t + 1).copied().unwrap_or(0) as usize;
            let n = n as usize;
            let hp = h_prev.narrow(0, start as i64, n as i64);
            let _ = b_hh.addmm_out(&gh.narrow(0, start as i64, n as i64), &hp, &w_hh_t);
            // SAFETY: all five are contiguous CPU float tensors this function allocated (or
            // `gates`, only read); the slices cover disjoint rows of them (the states written,
            // `h_prev`'s next step, lie after the ones read) and live only for this call, while
            // no libtorch operation runs.
            unsafe {
                let (h_read, h_next) = (
                    rows(&h_prev, start * hidden, n * hidden),
                    rows(&h_prev, (start + n) * hidden, next * hidden),
                );
                gru_step::forward(
                    hidden,
                    rows(&gates, start * 3 * hidden, n * 3 * hidden),
                    rows(&gh, start * 3 * hidden, n * 3 * hidden),
                    h_read,
                    rows(&rz, start * 2 * hidden, n * 2 * hidden),
                    rows(&n_gate, start * hidden, n * hidden),
                    h_next,
                    rows(&out, next * hidden, (n - next) * hidden),
                );
            }
            start += n;
        }
        let tape = Tape {
            running: running.to_vec(),
            h_prev,
            gh,
            rz,
            n: n_gate,
            w_hh: w.w_hh.shallow_clone(),
            b_hh: w.b_hh.shallow_clone(),
        };
        (out, tape)
    })
}

/// `len` floats of a contiguous CPU float tensor from `at` on.
///
/// # Safety
/// `t` must be contiguous, on the CPU and of kind float, hold `at + len` floats, and nothing
/// else may touch those floats while the slice lives.
#[allow(clippy::mut_from_ref)]
unsafe fn rows(t: &Tensor, at: usize, len: usize) -> &mut [f32] {
    debug_assert!(t.is_contiguous() && t.kind() == Kind::Float && at + len <= t.numel());
    std::slice::from_raw_parts_mut((t.data_ptr() as *mut f32).add(at), len)
}

impl Tape {
    /// The gradients of the input gates, `W_hh` and `b_hh` given `d_states`, the gradient of
    /// the states [`forward`] returned (`[B, H]`, run order).
    pub fn backward(&self, d_states: &Tensor) -> TapeGrads {
        tch::no_grad(|| {
            let hidden = self.w_hh.size()[1];
            let events = self.h_prev.size()[0];
            let on = (Kind::Float, Device::Cpu);
            let w_hh = self.w_hh.detach();
            let d_gates = Tensor::empty([events, 3 * hidden], on);
            let d_gh = Tensor::empty([events, 3 * hidden], on);
            let first = self.running.first().copied().unwrap_or(0);
            // Rows `..running[t + 1]` hold the gradient flowing back from step `t + 1`.
            let dh = Tensor::zeros([first, hidden], on);
            let ends: Vec<i64> = self
                .running
                .iter()
                .scan(0, |at, &n| {
                    *at += n;
                    Some(*at)
                })
                .collect();
            let width = hidden as usize;
            for t in (0..self.running.len()).rev() {
                let n = self.running[t];
                if n == 0 {
                    continue;
                }
                let start = ends[t] - n;
                let next = self.running.get(t + 1).copied().unwrap_or(0);
                if next < n {
                    dh.narrow(0, next, n - next)
                        .copy_(&d_states.narrow(0, next, n - next));
                }
                let (at, len) = (start as usize, n as usize);
                // SAFETY: contiguous CPU float tensors this function or `forward` allocated;
                // the slices live only for this call, while no libtorch operation runs.
                unsafe {
                    gru_step::backward(
                        width,
                        rows(&dh, 0, len * width),
                        rows(&self.rz, at * 2 * width, len * 2 * width),
                        rows(&self.n, at * width, len * width),
                        rows(&self.h_prev, at * width, len * width),
                        rows(&self.gh, at * 3 * width, len * 3 * width),
                        rows(&d_gates, at * 3 * width, len * 3 * width),
                        rows(&d_gh, at * 3 * width, len * 3 * width),
                    );
                }
                // The previous states' gradient: the direct part, plus what `W_hh` carries back.
                let _ = dh.narrow(0, 0, n).addmm_(&d_gh.narrow(0, start, n), &w_hh);
            }
            TapeGrads {
                w_hh: d_gh.tr().mm(&self.h_prev),
                b_hh: d_gh.sum_dim_intlist(0, false, Kind::Float),
                gates: d_gates,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recurrence::{last_states, Packing};
    use tch::{nn, Device};

    #[test]
    fn the_taped_recurrence_has_autograds_values_and_gradients() {
        tch::manual_seed(9);
        let (input, hidden) = (10, 16);
        let vs = nn::VarStore::new(Device::Cpu);
        let _gru = nn::gru(vs.root() / "gru", input, hidden, Default::default());
        let w = GruWeights::of(&(vs.root() / "gru")).unwrap();
        let lens = [4, 0, 7, 1, 7, 3, 2];
        let (b, l) = (lens.len() as i64, 7);
        let packing = Packing::of(&lens, l);
        let events = packing.events.len() as i64;
        let gates =
            Tensor::randn([events, 3 * hidden], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let probe = Tensor::randn([b, hidden], (Kind::Float, Device::Cpu));

        let expected = last_states(&gates, &packing.running, b, &w);
        let wrt = [&gates, &w.w_hh, &w.b_hh];
        let want =
            Tensor::run_backward(&[(&expected * &probe).sum(Kind::Float)], &wrt, false, false);

        let (states, tape) = forward(&gates, &packing.running, b, &w);
        assert!((&states - &expected).abs().max().double_value(&[]) < 1e-6);
        let got = tape.backward(&probe);
        for (name, e, g) in [
            ("gates", &want[0], &got.gates),
            ("w_hh", &want[1], &got.w_hh),
            ("b_hh", &want[2], &got.b_hh),
        ] {
            let diff = (e - g).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name}: off by {diff}");
        }
    }

    #[test]
    fn inside_recording_the_states_are_a_leaf_and_the_run_is_kept() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _gru = nn::gru(vs.root() / "gru", 4, 6, Default::default());
        let w = GruWeights::of(&(vs.root() / "gru")).unwrap();
        let gates = Tensor::randn([5, 18], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let (states, recorded) = recording(|| last_states(&gates, &[3, 2], 4, &w));
        assert_eq!(recorded.len(), 1);
        assert!(states.requires_grad() && states.is_leaf());
        assert!(!is_recording());
        // Outside, the same call is in autograd's graph again.
        let states = last_states(&gates, &[3, 2], 4, &w);
        assert!(!states.is_leaf());
    }
}
