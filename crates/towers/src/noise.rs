//! Where a training forward draws its random masks (dropout, hidden ids) from.
//!
//! By default that is libtorch's global generator, which `tch::manual_seed` seeds. Training
//! on the CPU runs a batch's parts on several threads at once (`trainer::parts`), and draws
//! from one global generator would then interleave in whatever order the threads reach it: the
//! same seed would no longer give the same model. [`seeded`] gives the forwards run inside it,
//! on the calling thread, their own generator instead, seeded by the caller (from the run's
//! seed, the step and the part), so a run in parts follows its seed whatever the timing.

use std::cell::RefCell;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// A seeded generator and the buffer its masks are built in, reused from draw to draw (a
/// fresh buffer per mask cost the kernel's page zeroing a few per cent of a training step).
struct Seeded {
    rng: ChaCha8Rng,
    buffer: Vec<f32>,
}

thread_local! {
    static GENERATOR: RefCell<Option<Seeded>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's masks drawn from a generator seeded with `seed`; the global
/// generator is used again afterwards (also when `f` panics).
pub fn seeded<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Seeded>);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERATOR.with(|g| *g.borrow_mut() = self.0.take());
        }
    }
    let fresh = Seeded {
        rng: ChaCha8Rng::seed_from_u64(seed),
        buffer: Vec::new(),
    };
    let previous = GENERATOR.with(|g| g.borrow_mut().replace(fresh));
    let _restore = Restore(previous);
    f()
}

/// A float tensor of `shape` whose elements are `hit` with probability `p` and `miss`
/// otherwise, from this thread's seeded generator; `None` outside [`seeded`].
fn seeded_mask(shape: &[i64], p: f64, hit: f32, miss: f32) -> Option<Tensor> {
    GENERATOR.with(|g| {
        let mut g = g.borrow_mut();
        let Seeded { rng, buffer } = g.as_mut()?;
        let count = shape.iter().product::<i64>().max(0) as usize;
        // `p` as a threshold on uniform words: a word is below it with probability `p`.
        let threshold = (p.clamp(0.0, 1.0) * 4_294_967_296.0) as u64;
        buffer.clear();
        let mut words = [0u32; 256];
        while buffer.len() < count {
            let n = (count - buffer.len()).min(words.len());
            rng.fill(&mut words[..n]);
            buffer.extend(
                words[..n]
                    .iter()
                    .map(|&w| if u64::from(w) < threshold { hit } else { miss }),
            );
        }
        Some(Tensor::from_slice(buffer).view(shape))
    })
}

/// A bool tensor of `shape` whose elements are true with probability `p`.
pub fn bernoulli(shape: &[i64], p: f64, device: Device) -> Tensor {
    match seeded_mask(shape, p, 1.0, 0.0) {
        Some(mask) => mask.to_device(device).gt(0.5),
        None => Tensor::rand(shape, (Kind::Float, device)).lt(p),
    }
}

/// Inverted dropout at rate `p` in training (identity otherwise), as `Tensor::dropout`.
pub fn dropout(xs: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return xs.dropout(p, train);
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    match seeded_mask(&xs.size(), 1.0 - p, scale, 0.0) {
        Some(mask) => xs * mask.to_device(xs.device()).to_kind(xs.kind()),
        None => xs.dropout(p, train),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_masks_on_any_thread() {
        let x = Tensor::ones([64, 32], (Kind::Float, Device::Cpu));
        let here = seeded(7, || {
            (dropout(&x, 0.25, true), bernoulli(&[100], 0.3, Device::Cpu))
        });
        let there = std::thread::spawn(move || {
            let x = Tensor::ones([64, 32], (Kind::Float, Device::Cpu));
            seeded(7, || {
                (dropout(&x, 0.25, true), bernoulli(&[100], 0.3, Device::Cpu))
            })
        })
        .join()
        .unwrap();
        assert!(here.0.equal(&there.0) && here.1.equal(&there.1));
        let other = seeded(8, || dropout(&x, 0.25, true));
        assert!(!here.0.equal(&other));
    }

    #[test]
    fn seeded_dropout_keeps_the_expected_share_and_scale() {
        let x = Tensor::ones([200, 100], (Kind::Float, Device::Cpu));
        let y = seeded(1, || dropout(&x, 0.25, true));
        let kept = y
            .gt(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        let max = y.max().double_value(&[]);
        assert!((max - 1.0 / 0.75).abs() < 1e-6);
        // The mean is unchanged in expectation, and evaluation is the identity.
        assert!((y.mean(Kind::Float).double_value(&[]) - 1.0).abs() < 0.02);
        assert!(seeded(1, || dropout(&x, 0.25, false)).equal(&x));
    }

    #[test]
    fn the_global_generator_is_back_after_a_seeded_block_even_one_that_panicked() {
        seeded(3, || assert!(seeded_mask(&[1], 0.5, 1.0, 0.0).is_some()));
        assert!(seeded_mask(&[1], 0.5, 1.0, 0.0).is_none());
        let panicked = std::panic::catch_unwind(|| seeded(4, || panic!("inside")));
        assert!(panicked.is_err());
        assert!(seeded_mask(&[1], 0.5, 1.0, 0.0).is_none());
        // Outside, masks come from libtorch's generator: the same shapes and rates.
        let hits = bernoulli(&[4000], 0.25, Device::Cpu);
        let share = hits
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((share - 0.25).abs() < 0.03, "{share}");
    }
}
