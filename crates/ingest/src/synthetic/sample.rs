//! Small deterministic sampling helpers shared by the catalog and the users.
//!
//! Anything that must be recomputable from an index alone (an item's brand, its listing time)
//! comes from hashing the index with [`mix`], so no per-item array is ever stored. Sequential
//! draws use a `ChaCha8Rng` seeded from such a hash.

use std::collections::BTreeSet;
use std::ops::Range;

use rand::Rng;

/// SplitMix64's finalizer: a fast, well-mixed 64-bit hash, stable across platforms.
pub(super) fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of `key` in the stream named by `salt` (distinct salts give independent streams).
pub(super) fn mix(salt: u64, key: u64) -> u64 {
    splitmix(salt ^ splitmix(key))
}

/// A uniform number in `[0, 1)` from a hash.
pub(super) fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A rank in `0..n` from a uniform `u`, with P(rank = r) roughly ∝ (r + 1)^-s: the inverse CDF
/// of a continuous power law on `[1, n + 1)`. O(1) and allocation-free, so it serves leaves of
/// millions of items; `s = 0` is uniform. Small `u` gives small (popular) ranks.
pub(super) fn zipf_rank(u: f64, n: u64, s: f64) -> u64 {
    if n <= 1 {
        return 0;
    }
    let top = n as f64 + 1.0;
    let x = if (s - 1.0).abs() < 1e-6 {
        top.powf(u)
    } else {
        let e = 1.0 - s;
        (1.0 + u * (top.powf(e) - 1.0)).powf(1.0 / e)
    };
    (x as u64).saturating_sub(1).min(n - 1)
}

/// A standard normal draw (Box–Muller).
pub(super) fn normal(rng: &mut impl Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// An exponential draw with mean 1.
pub(super) fn exponential(rng: &mut impl Rng) -> f64 {
    -(1.0 - rng.random::<f64>()).ln()
}

/// Index drawn from a short list of weights (linear scan; for constant tables).
pub(super) fn pick(rng: &mut impl Rng, weights: &[f64]) -> usize {
    let mut target = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if target < *w {
            return i;
        }
        target -= w;
    }
    weights.len() - 1
}

/// A discrete distribution over `0..len` by cumulative weights: O(log len) draws, also
/// restricted to a sub-range (e.g. the leaves of one top-level category).
#[derive(Debug, Clone)]
pub(super) struct Weighted {
    cum: Vec<f64>,
}

impl Weighted {
    pub fn new(weights: impl IntoIterator<Item = f64>) -> Weighted {
        let mut acc = 0.0;
        let cum = weights
            .into_iter()
            .map(|w| {
                acc += w.max(0.0);
                acc
            })
            .collect();
        Weighted { cum }
    }

    pub fn weight(&self, i: usize) -> f64 {
        self.cum[i] - if i == 0 { 0.0 } else { self.cum[i - 1] }
    }

    /// An index with positive weight (0 if every weight is zero).
    pub fn sample(&self, u: f64) -> usize {
        self.sample_in(u, 0..self.cum.len()).unwrap_or(0)
    }

    /// An index in `range` with positive weight, or `None` when the range has no weight.
    pub fn sample_in(&self, u: f64, range: Range<usize>) -> Option<usize> {
        if range.is_empty() {
            return None;
        }
        let before = if range.start == 0 {
            0.0
        } else {
            self.cum[range.start - 1]
        };
        let mass = self.cum[range.end - 1] - before;
        if mass <= 0.0 {
            return None;
        }
        let target = before + u * mass;
        let mut i = (range.start + self.cum[range.clone()].partition_point(|&c| c <= target))
            .min(range.end - 1);
        // Rounding can land on a zero-weight tail entry; step back to a real one.
        while i > range.start && self.weight(i) <= 0.0 {
            i -= 1;
        }
        Some(i)
    }
}

/// An affine bijection of `0..n`, x ↦ (a·x + b) mod n, with its inverse. It decides which item
/// of a leaf gets which popularity rank (and which user gets which activity level) without
/// storing a permutation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shuffle {
    n: u64,
    a: u64,
    b: u64,
    a_inv: u64,
}

impl Shuffle {
    pub fn new(n: u64, h: u64) -> Shuffle {
        let n = n.max(1);
        let mut a = (h % n).max(1);
        while gcd(a, n) != 1 {
            a = a % (n - 1) + 1;
        }
        Shuffle {
            n,
            a,
            b: splitmix(h) % n,
            a_inv: mod_inverse(a, n),
        }
    }

    pub fn apply(&self, x: u64) -> u64 {
        ((x as u128 * self.a as u128 + self.b as u128) % self.n as u128) as u64
    }

    pub fn invert(&self, y: u64) -> u64 {
        let shifted = (y % self.n + self.n - self.b) % self.n;
        (shifted as u128 * self.a_inv as u128 % self.n as u128) as u64
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Inverse of `a` modulo `n` (extended Euclid); `a` and `n` must be coprime.
fn mod_inverse(a: u64, n: u64) -> u64 {
    let (mut r0, mut r1) = (n as i128, a as i128);
    let (mut t0, mut t1) = (0i128, 1i128);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(n as i128) as u64
}

/// Makes unique pronounceable made-up words ("toravin", "kesh") for category names, brands and
/// category-specific title words. Made-up words cannot collide with the real generic words, so
/// every distinctive word really belongs to one category.
pub(super) struct WordMaker {
    used: BTreeSet<String>,
}

const ONSETS: [&str; 20] = [
    "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st",
    "tr", "gr",
];
const VOWELS: [&str; 6] = ["a", "e", "i", "o", "u", "ai"];
const CODAS: [&str; 9] = ["", "", "", "n", "r", "s", "l", "x", "k"];

impl WordMaker {
    /// A maker that never returns any of `reserved`.
    pub fn new<'a>(reserved: impl IntoIterator<Item = &'a str>) -> WordMaker {
        WordMaker {
            used: reserved.into_iter().map(str::to_string).collect(),
        }
    }

    pub fn make(&mut self, rng: &mut impl Rng) -> String {
        loop {
            let mut w = String::new();
            for _ in 0..rng.random_range(2..=3) {
                w.push_str(ONSETS[rng.random_range(0..ONSETS.len())]);
                w.push_str(VOWELS[rng.random_range(0..VOWELS.len())]);
            }
            w.push_str(CODAS[rng.random_range(0..CODAS.len())]);
            if self.used.insert(w.clone()) {
                return w;
            }
        }
    }
}

/// `"kesh"` → `"Kesh"`.
pub(super) fn capitalize(w: &str) -> String {
    let mut c = w.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_shuffle_is_a_bijection_with_inverse() {
        for n in [1u64, 2, 7, 12, 100, 1024] {
            let s = Shuffle::new(n, splitmix(n));
            let mut seen = vec![false; n as usize];
            for x in 0..n {
                let y = s.apply(x);
                assert!(!seen[y as usize]);
                seen[y as usize] = true;
                assert_eq!(s.invert(y), x);
            }
        }
    }

    #[test]
    fn synthetic_zipf_is_in_range_and_skewed() {
        let n = 1000;
        let mut counts = vec![0u32; n as usize];
        for i in 0..100_000u64 {
            counts[zipf_rank(unit(splitmix(i)), n, 1.0) as usize] += 1;
        }
        assert!(counts[0] > counts[10] && counts[10] > counts[500]);
        assert!(
            counts[..10].iter().sum::<u32>() > 25_000,
            "{:?}",
            &counts[..10]
        );
        assert_eq!(zipf_rank(0.999_999, 5, 0.0), 4);
    }

    #[test]
    fn synthetic_weighted_skips_zero_weights() {
        let w = Weighted::new([0.0, 1.0, 0.0, 3.0, 0.0]);
        for k in 0..1000 {
            let i = w.sample(k as f64 / 1000.0);
            assert!(i == 1 || i == 3);
        }
        assert_eq!(w.sample_in(0.5, 0..1), None);
        assert_eq!(w.sample_in(0.99, 1..3), Some(1));
    }
}
