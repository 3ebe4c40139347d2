//! The user tower's GRU recurrence for CPU inference.
//!
//! libtorch runs each GRU step as about fourteen operations (a matrix product, chunks, gates),
//! and at serving's batch sizes of one to a few users their fixed cost, not arithmetic, is most
//! of a forward pass: about 0.8 ms for one user over 20 steps (`docs/benchmarks.md`). Here the
//! input projection of every step stays one libtorch matrix product, and the recurrence (the
//! hidden-to-hidden product and the gates) is a loop over contiguous rows. The equations and the
//! weights are `torch.nn.GRU`'s (gate order r, z, n); training and every gradient still go
//! through libtorch's GRU, and `the_cpu_recurrence_equals_libtorchs_gru` holds the two equal.

use tch::{Device, Kind, Tensor};

use crate::dot::dot;

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
}

/// Batches up to this size take the loop. It costs about 0.17 ms a user for 20 steps of a
/// 128-wide GRU, against libtorch's 0.7 ms fixed cost plus 0.2 ms a user at serving's sizes
/// (`docs/benchmarks.md`), but libtorch's matrix products pull ahead on evaluation's batches of
/// hundreds.
pub const MAX_BATCH: i64 = 16;

/// The GRU's output at every step (`[B, L, H]`) for `x` (`[B, L, I]`, batch first, from a zero
/// state), or `None` where this path does not apply (not on the CPU, gradients wanted, more
/// than [`MAX_BATCH`] users, or an unexpected shape): the caller then runs libtorch's GRU.
pub fn gru_cpu(x: &Tensor, w: &GruWeights) -> Option<Tensor> {
    if x.device() != Device::Cpu || x.requires_grad() || x.kind() != Kind::Float {
        return None;
    }
    let [b, l, _] = x.size()[..] else {
        return None;
    };
    if b > MAX_BATCH {
        return None;
    }
    let h3 = *w.w_hh.size().first()?;
    let hidden = (h3 / 3) as usize;
    let gi = x.f_matmul(&w.w_ih.tr()).ok()? + &w.b_ih;
    let gi = Vec::<f32>::try_from(gi.contiguous().flatten(0, -1)).ok()?;
    let w_hh = Vec::<f32>::try_from(w.w_hh.contiguous().flatten(0, -1)).ok()?;
    let b_hh = Vec::<f32>::try_from(w.b_hh.contiguous()).ok()?;
    if w_hh.len() != 3 * hidden * hidden || b_hh.len() != 3 * hidden {
        return None;
    }
    let (b, l) = (b as usize, l as usize);
    let mut out = vec![0f32; b * l * hidden];
    let mut h = vec![0f32; hidden];
    let mut gh = vec![0f32; 3 * hidden];
    for row in 0..b {
        h.fill(0.0);
        for step in 0..l {
            let at = row * l + step;
            hidden_product(&w_hh, &b_hh, &h, &mut gh);
            let gi = &gi[at * 3 * hidden..][..3 * hidden];
            for k in 0..hidden {
                let r = sigmoid(gi[k] + gh[k]);
                let z = sigmoid(gi[hidden + k] + gh[hidden + k]);
                let n = tanh(gi[2 * hidden + k] + r * gh[2 * hidden + k]);
                h[k] = (1.0 - z) * n + z * h[k];
            }
            out[at * hidden..][..hidden].copy_from_slice(&h);
        }
    }
    Some(Tensor::from_slice(&out).view([b as i64, l as i64, hidden as i64]))
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `tanh` through one `exp`, which costs a fraction of libm's `tanhf` (within 1e-7 of it).
fn tanh(x: f32) -> f32 {
    2.0 * sigmoid(2.0 * x) - 1.0
}

/// `out = w · h + bias` for a row-major `w` of `out.len()` rows.
fn hidden_product(w: &[f32], bias: &[f32], h: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { hidden_product_avx2(w, bias, h, out) };
            return;
        }
    }
    hidden_product_portable(w, bias, h, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hidden_product_avx2(w: &[f32], bias: &[f32], h: &[f32], out: &mut [f32]) {
    hidden_product_portable(w, bias, h, out);
}

#[inline(always)]
fn hidden_product_portable(w: &[f32], bias: &[f32], h: &[f32], out: &mut [f32]) {
    let n = h.len();
    for (j, o) in out.iter_mut().enumerate() {
        *o = bias[j] + dot(&w[j * n..][..n], h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, RNN};

    #[test]
    fn the_cpu_recurrence_equals_libtorchs_gru() {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = nn::RNNConfig {
            batch_first: true,
            ..Default::default()
        };
        let gru = nn::gru(vs.root() / "gru", 12, 20, cfg);
        let w = GruWeights::of(&(vs.root() / "gru")).unwrap();
        for (b, l) in [(1, 1), (3, 7), (MAX_BATCH, 20)] {
            let x = Tensor::randn([b, l, 12], (Kind::Float, Device::Cpu));
            let (expected, _) = tch::no_grad(|| gru.seq(&x));
            let got = tch::no_grad(|| gru_cpu(&x, &w)).unwrap();
            assert_eq!(got.size(), expected.size());
            let diff = (got - expected).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "batch {b}, {l} steps: max difference {diff}");
        }
    }

    #[test]
    fn gradients_and_big_batches_take_libtorchs_gru() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _gru = nn::gru(vs.root() / "gru", 4, 6, Default::default());
        let w = GruWeights::of(&(vs.root() / "gru")).unwrap();
        let x = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(gru_cpu(&x, &w).is_none());
        let big = Tensor::randn([MAX_BATCH + 1, 3, 4], (Kind::Float, Device::Cpu));
        assert!(tch::no_grad(|| gru_cpu(&big, &w)).is_none());
    }
}
