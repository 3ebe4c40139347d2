//! The element-wise part of one GRU step, forward and backward, fused into one pass over rows
//! of plain `f32`s.
//!
//! Between its hidden products a GRU step is a dozen element-wise operations on a few thousand
//! numbers. As libtorch operations each one is a call with its own dispatch, views and output
//! (session 27's profile: most of a training step's recurrence time), while the arithmetic
//! itself is a few microseconds. Here they are one loop the compiler vectorises (AVX2 and FMA
//! where the CPU has them, chosen at run time), with `exp` written out as a polynomial so that
//! it vectorises too. The recurrence's forward (`bptt.rs`, and the small-batch loop in
//! `recurrence.rs`) and its written-out backward share these kernels; tests hold them to
//! libtorch's GRU and autograd. Small batches also take their hidden products from here
//! ([`hidden_products`]), where BLAS's fixed cost per call is most of the work.
//!
//! Layouts, per row: gates `[r | z | n]` (`3H`, `torch.nn.GRU`'s order), `rz` after the sigmoid
//! (`2H`), the candidate `n` after the tanh (`H`), states `H`.

/// `e^x` to within a few units in the last place: `2^k · e^r` with `|r| ≤ ln 2 / 2` and Cephes'
/// `expf` polynomial. Inputs are clamped to `[-87, 88]`, where `2^k` is a normal float.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // 1.5 · 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((k_bits + 127) << 23) as u32)
}

#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh` through one `exp` (within 1e-7 of libm's `tanhf`, absolute).
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    2.0 * sigmoid(2.0 * x) - 1.0
}

/// Defines `$name`, which runs `$portable` compiled for AVX2 and FMA (`$avx2`) on CPUs that
/// [`has_avx2`], and as plain code elsewhere.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident => $portable:ident, $avx2:ident, ($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU has the features the function is compiled for.
                unsafe { $avx2($($arg),*) };
                return;
            }
            $portable($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx2($($arg: $ty),*) {
            $portable($($arg),*)
        }
    };
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

dispatch!(
    /// One step forward for `rows` rows: from the input gates `gi` and the hidden products `gh`
    /// (`h_prev · W_hhᵀ + b_hh`, both `[rows, 3H]`) and the previous states (`[rows, H]`),
    /// writes the gates after their activations (`rz`, `n`) and the new states. The first rows'
    /// states go to `h_first`, the rest to `h_rest` (the recurrence keeps running rows and
    /// finished rows apart). Panics where the buffers do not hold the same rows.
    forward => forward_portable, forward_avx2,
    (hidden: usize, gi: &[f32], gh: &[f32], h_prev: &[f32], rz: &mut [f32], n: &mut [f32],
     h_first: &mut [f32], h_rest: &mut [f32])
);

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_portable(
    hidden: usize,
    gi: &[f32],
    gh: &[f32],
    h_prev: &[f32],
    rz: &mut [f32],
    n: &mut [f32],
    h_first: &mut [f32],
    h_rest: &mut [f32],
) {
    let rows = h_prev.len() / hidden;
    assert!(
        gi.len() == rows * 3 * hidden
            && gh.len() == gi.len()
            && rz.len() == rows * 2 * hidden
            && n.len() == h_prev.len()
            && h_first.len() + h_rest.len() == h_prev.len(),
        "GRU step forward: buffers do not hold {rows} rows of {hidden}"
    );
    let h_out = h_first
        .chunks_exact_mut(hidden)
        .chain(h_rest.chunks_exact_mut(hidden));
    let rows = gi
        .chunks_exact(3 * hidden)
        .zip(gh.chunks_exact(3 * hidden))
        .zip(h_prev.chunks_exact(hidden))
        .zip(rz.chunks_exact_mut(2 * hidden))
        .zip(n.chunks_exact_mut(hidden))
        .zip(h_out);
    for (((((gi, gh), hp), rz), n), h) in rows {
        for ((rz, &i), &g) in rz.iter_mut().zip(&gi[..2 * hidden]).zip(&gh[..2 * hidden]) {
            *rz = sigmoid(i + g);
        }
        let (r, z) = rz.split_at(hidden);
        let (gi_n, gh_n) = (&gi[2 * hidden..], &gh[2 * hidden..]);
        for (((n, &i), &g), &r) in n.iter_mut().zip(gi_n).zip(gh_n).zip(r) {
            *n = tanh(i + r * g);
        }
        // h = n + z · (h_prev − n)
        for (((h, &n), &z), &hp) in h.iter_mut().zip(n.iter()).zip(z).zip(hp) {
            *h = n + z * (hp - n);
        }
    }
}

/// The hidden products of one step for small batches: `gh[r] = W_hh · h[r] + b_hh` for each
/// row `r` of `h` (`[rows, H]`), with `w_hh` row-major `[3H, H]` and `gh` `[rows, 3H]`.
///
/// A BLAS `addmm` packs all of `W_hh` on every call, which at serving's few rows costs more
/// than the product, and a dot product per row and output streams `W_hh` once per row. Here
/// each block of up to four rows reads each row of `W_hh` once for all of them, several
/// outputs at a time, in eight-lane sums (AVX2 and FMA where the CPU has them). Panics where
/// the buffers do not hold the same rows.
pub(crate) fn hidden_products(
    hidden: usize,
    w_hh: &[f32],
    b_hh: &[f32],
    h: &[f32],
    gh: &mut [f32],
) {
    let (gates, rows) = (3 * hidden, h.len() / hidden.max(1));
    assert!(
        w_hh.len() == gates * hidden
            && b_hh.len() == gates
            && h.len() == rows * hidden
            && gh.len() == rows * gates,
        "GRU hidden products: buffers do not hold {rows} rows of {hidden}"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA, and the buffers hold `rows` rows (asserted above).
        unsafe { avx2::hidden_products(hidden, rows, w_hh, b_hh, h, gh) };
        return;
    }
    hidden_products_portable(hidden, w_hh, b_hh, h, gh);
}

/// [`hidden_products`] as one dot product per row and output, where the CPU lacks AVX2.
fn hidden_products_portable(hidden: usize, w_hh: &[f32], b_hh: &[f32], h: &[f32], gh: &mut [f32]) {
    for (h, gh) in h.chunks_exact(hidden).zip(gh.chunks_exact_mut(3 * hidden)) {
        for ((gh, w), &b) in gh.iter_mut().zip(w_hh.chunks_exact(hidden)).zip(b_hh) {
            *gh = b + crate::dot::dot(w, h);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::hidden_products`] in blocks of up to four rows.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA, and the buffers must hold `rows` rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hidden_products(
        hidden: usize,
        rows: usize,
        w_hh: &[f32],
        b_hh: &[f32],
        h: &[f32],
        gh: &mut [f32],
    ) {
        let mut r0 = 0;
        while r0 < rows {
            // Eight running sums whatever the block's rows, so the FMA units never wait.
            match rows - r0 {
                1 => block::<1, 8>(hidden, w_hh, b_hh, h, gh, r0),
                2 => block::<2, 4>(hidden, w_hh, b_hh, h, gh, r0),
                3 => block::<3, 2>(hidden, w_hh, b_hh, h, gh, r0),
                _ => block::<4, 2>(hidden, w_hh, b_hh, h, gh, r0),
            }
            r0 += (rows - r0).min(4);
        }
    }

    /// Rows `r0..r0 + R`, `J` outputs at a time (the last group repeats the last output
    /// rather than reading past `W_hh`, and stores only real ones).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const R: usize, const J: usize>(
        hidden: usize,
        w_hh: &[f32],
        b_hh: &[f32],
        h: &[f32],
        gh: &mut [f32],
        r0: usize,
    ) {
        let gates = 3 * hidden;
        let lanes = hidden / 8 * 8;
        let hs: [*const f32; R] = std::array::from_fn(|r| h.as_ptr().add((r0 + r) * hidden));
        let mut j = 0;
        while j < gates {
            let outs: [usize; J] = std::array::from_fn(|o| (j + o).min(gates - 1));
            let ws: [*const f32; J] = outs.map(|o| w_hh.as_ptr().add(o * hidden));
            let mut acc = [[_mm256_setzero_ps(); R]; J];
            let mut k = 0;
            while k < lanes {
                for o in 0..J {
                    let w = _mm256_loadu_ps(ws[o].add(k));
                    for r in 0..R {
                        acc[o][r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(hs[r].add(k)), acc[o][r]);
                    }
                }
                k += 8;
            }
            for o in 0..J.min(gates - j) {
                for r in 0..R {
                    let mut sum = b_hh[outs[o]] + horizontal_sum(acc[o][r]);
                    for k in lanes..hidden {
                        sum += *ws[o].add(k) * *hs[r].add(k);
                    }
                    gh[(r0 + r) * gates + outs[o]] = sum;
                }
            }
            j += J;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
    }
}

dispatch!(
    /// One step backward for `rows` rows, from what [`forward`] kept (`rz`, `n`, `h_prev`, and
    /// the hidden products' `n` part in `gh`). On entry `dh` holds the gradient of the step's
    /// states; on return it holds the part that flows straight to the previous states
    /// (`dh · z`), to which the caller adds `d_gh · W_hh`. Writes the input gates' gradient
    /// `d_gates` and the hidden products' `d_gh` (both `[rows, 3H]`). Panics where the buffers
    /// do not hold the same rows.
    backward => backward_portable, backward_avx2,
    (hidden: usize, dh: &mut [f32], rz: &[f32], n: &[f32], h_prev: &[f32], gh: &[f32],
     d_gates: &mut [f32], d_gh: &mut [f32])
);

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_portable(
    hidden: usize,
    dh: &mut [f32],
    rz: &[f32],
    n: &[f32],
    h_prev: &[f32],
    gh: &[f32],
    d_gates: &mut [f32],
    d_gh: &mut [f32],
) {
    let rows = dh.len() / hidden;
    assert!(
        rz.len() == rows * 2 * hidden
            && n.len() == dh.len()
            && h_prev.len() == dh.len()
            && gh.len() == rows * 3 * hidden
            && d_gates.len() == gh.len()
            && d_gh.len() == gh.len(),
        "GRU step backward: buffers do not hold {rows} rows of {hidden}"
    );
    let rows = dh
        .chunks_exact_mut(hidden)
        .zip(rz.chunks_exact(2 * hidden))
        .zip(n.chunks_exact(hidden))
        .zip(h_prev.chunks_exact(hidden))
        .zip(gh.chunks_exact(3 * hidden))
        .zip(d_gates.chunks_exact_mut(3 * hidden))
        .zip(d_gh.chunks_exact_mut(3 * hidden));
    for ((((((dh, rz), n), hp), gh), dg), dgh) in rows {
        let (r, z) = rz.split_at(hidden);
        let gh_n = &gh[2 * hidden..];
        let (dg_rz, dg_n) = dg.split_at_mut(2 * hidden);
        let (dg_r, dg_z) = dg_rz.split_at_mut(hidden);
        let (dgh_rz, dgh_n) = dgh.split_at_mut(2 * hidden);
        let (dgh_r, dgh_z) = dgh_rz.split_at_mut(hidden);
        for k in 0..hidden {
            // h = n + z · (h_prev − n)
            let (d, z, r, n) = (dh[k], z[k], r[k], n[k]);
            let direct = d * z;
            let dn = (d - direct) * (1.0 - n * n);
            let dz = (hp[k] - n) * d * z * (1.0 - z);
            let dr = dn * gh_n[k] * r * (1.0 - r);
            dh[k] = direct;
            dg_r[k] = dr;
            dg_z[k] = dz;
            dg_n[k] = dn;
            dgh_r[k] = dr;
            dgh_z[k] = dz;
            dgh_n[k] = dn * r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulps_of_libms() {
        for i in -8700..8799 {
            let x = i as f32 * 0.01 + 0.003;
            let (want, got) = (x.exp(), exp(x));
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}): {got} against {want}"
            );
        }
        assert!(exp(-200.0) < 1e-37 && exp(200.0).is_finite());
    }

    #[test]
    fn hidden_products_in_blocks_equal_plain_sums_for_any_rows_and_width() {
        let value = |i: usize| ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
        for hidden in [1, 5, 8, 20, 37, 128] {
            let gates = 3 * hidden;
            let w: Vec<f32> = (0..gates * hidden).map(value).collect();
            let b: Vec<f32> = (0..gates).map(|i| value(i + 3)).collect();
            for rows in 0..=9 {
                let h: Vec<f32> = (0..rows * hidden).map(|i| value(i + 11)).collect();
                let mut blocked = vec![f32::NAN; rows * gates];
                let mut portable = vec![f32::NAN; rows * gates];
                hidden_products(hidden, &w, &b, &h, &mut blocked);
                hidden_products_portable(hidden, &w, &b, &h, &mut portable);
                for (at, (x, y)) in blocked.iter().zip(&portable).enumerate() {
                    let (r, j) = (at / gates, at % gates);
                    let plain: f64 = b[j] as f64
                        + (0..hidden)
                            .map(|k| w[j * hidden + k] as f64 * h[r * hidden + k] as f64)
                            .sum::<f64>();
                    assert!(
                        (*x as f64 - plain).abs() < 1e-4 && (*y as f64 - plain).abs() < 1e-4,
                        "hidden {hidden}, {rows} rows, row {r} output {j}: {x} / {y} against {plain}"
                    );
                }
            }
        }
    }

    #[test]
    fn sigmoid_and_tanh_are_within_1e7_of_libms() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let sig = 1.0 / (1.0 + (-x as f64).exp());
            assert!((sigmoid(x) as f64 - sig).abs() < 1e-7, "sigmoid({x})");
            assert!(
                (tanh(x) as f64 - (x as f64).tanh()).abs() < 2e-7,
                "tanh({x})"
            );
        }
    }
}
