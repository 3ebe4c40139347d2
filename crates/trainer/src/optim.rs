//! AdamW with a warm-up + cosine learning-rate schedule and global-norm gradient clipping.
//!
//! Written out (instead of tch's built-in optimizer) so its state — step count and both moment
//! estimates — can be checkpointed next to the weights and restored by `--resume`. Every update
//! stays on the device: clipping scales gradients by a device-side factor, so a training step
//! never waits for the host.

use std::path::Path;

use tch::{nn::VarStore, Kind, Tensor};

use crate::error::{Error, Result};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// (name, variable, first moment, second moment).
type Slot = (String, Tensor, Tensor, Tensor);

/// One step's AdamW constants.
#[derive(Clone, Copy)]
struct Update {
    lr: f64,
    weight_decay: f64,
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`: the moments' bias corrections.
    bias1: f64,
    bias2: f64,
}

impl Update {
    /// Updates one variable and its moments with its gradient `g`, scaled by `scale` (the
    /// clipping factor); call under `no_grad`.
    fn apply(&self, (_, t, m, v): &mut Slot, g: &Tensor, decay: bool, scale: &Tensor) {
        let g = g.nan_to_num(0.0, 0.0, 0.0) * scale;
        let _ = m.g_mul_scalar_(BETA1).g_add_(&(&g * (1.0 - BETA1)));
        let _ = v.g_mul_scalar_(BETA2).g_add_(&(g.square() * (1.0 - BETA2)));
        let update = (&*m / self.bias1) / ((&*v / self.bias2).sqrt() + EPS);
        if decay {
            let _ = t.g_mul_scalar_(1.0 - self.lr * self.weight_decay);
        }
        let _ = t.g_add_(&(update * -self.lr));
    }
}

/// AdamW over every trainable variable of a `VarStore`.
pub struct AdamW {
    /// (name, variable, first moment, second moment), sorted by name.
    slots: Vec<Slot>,
    /// Whether each slot gets weight decay (not biases, norms or the temperature).
    decays: Vec<bool>,
    pub step: u64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vs: &VarStore, weight_decay: f64) -> AdamW {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let decays = vars
            .iter()
            .map(|(name, _)| {
                !(name.ends_with(".bias") || name.contains(".norm") || name == "log_temperature")
            })
            .collect();
        let slots = vars
            .into_iter()
            .map(|(name, t)| {
                let m = t.zeros_like();
                let v = t.zeros_like();
                (name, t, m, v)
            })
            .collect();
        AdamW {
            slots,
            decays,
            step: 0,
            weight_decay,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, t, _, _) in &mut self.slots {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// The trainable variables, in the order [`step_with`](Self::step_with) takes gradients.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.slots
            .iter()
            .map(|(_, t, _, _)| t.shallow_clone())
            .collect()
    }

    /// Clips the global gradient norm to `max_norm`, then applies one AdamW update at `lr`,
    /// with the gradients the variables hold (`backward`). Weight decay skips biases, norms and
    /// the temperature.
    pub fn step(&mut self, lr: f64, max_norm: f64) {
        let grads: Vec<Tensor> = self.slots.iter().map(|(_, t, _, _)| t.grad()).collect();
        self.step_with(lr, max_norm, &grads, 1);
    }

    /// [`step`](Self::step) with gradients computed elsewhere, one per [`parameters`] entry
    /// (undefined for a variable without one). With `threads > 1` the variables are updated on
    /// that many threads at once, one libtorch thread each (`crate::threads`): the update is a
    /// dozen small element-wise operations per variable, too small to split each one well.
    ///
    /// [`parameters`]: Self::parameters
    pub fn step_with(&mut self, lr: f64, max_norm: f64, grads: &[Tensor], threads: usize) {
        assert_eq!(grads.len(), self.slots.len(), "one gradient per variable");
        self.step += 1;
        let defined: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
        if defined.is_empty() {
            return;
        }
        let scale = tch::no_grad(|| {
            let sq: Vec<Tensor> = defined
                .iter()
                .map(|g| g.square().sum(Kind::Float))
                .collect();
            let norm = Tensor::stack(&sq, 0).sum(Kind::Float).sqrt();
            // A non-finite gradient (overflow, a bad batch) must not poison the weights: its
            // contribution is zeroed on the device, without a host sync.
            let scale = (max_norm / (&norm + 1e-6)).clamp_max(1.0);
            scale.where_self(&norm.isfinite(), &scale.zeros_like())
        });
        let update = Update {
            lr,
            weight_decay: self.weight_decay,
            bias1: 1.0 - BETA1.powi(self.step as i32),
            bias2: 1.0 - BETA2.powi(self.step as i32),
        };
        let work: Vec<(&mut Slot, Tensor, bool, Tensor)> = self
            .slots
            .iter_mut()
            .zip(grads)
            .zip(&self.decays)
            .filter(|((_, g), _)| g.defined())
            .map(|((slot, g), &decay)| (slot, g.shallow_clone(), decay, scale.shallow_clone()))
            .collect();
        if threads <= 1 {
            tch::no_grad(|| {
                for (slot, g, decay, scale) in work {
                    update.apply(slot, &g, decay, &scale);
                }
            });
            return;
        }
        let groups =
            crate::threads::balanced(work, threads, |(slot, _, _, _)| slot.1.numel() as i64);
        crate::threads::on_threads(groups, threads, |_, group| {
            tch::no_grad(|| {
                for (slot, g, decay, scale) in group {
                    update.apply(slot, &g, decay, &scale);
                }
            })
        });
    }

    /// Saves the moments and step count (safetensors + the step in the tensor `step`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.slots.len() + 1);
        for (name, _, m, v) in &self.slots {
            named.push((format!("m.{name}"), m.shallow_clone()));
            named.push((format!("v.{name}"), v.shallow_clone()));
        }
        named.push(("step".into(), Tensor::from_slice(&[self.step as i64])));
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, path).map_err(|e| Error::BadFile {
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// Restores state saved by [`save`](Self::save) for the same model.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::BadFile {
            path: path.into(),
            reason,
        };
        let tensors = Tensor::read_safetensors(path)
            .map_err(|e| bad(format!("cannot read optimizer state: {e}")))?;
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let step = map
            .get("step")
            .ok_or_else(|| bad("no `step` tensor".into()))?;
        self.step = step.int64_value(&[0]) as u64;
        tch::no_grad(|| -> Result<()> {
            for (name, _, m, v) in &mut self.slots {
                for (prefix, slot) in [("m", &mut *m), ("v", &mut *v)] {
                    let key = format!("{prefix}.{name}");
                    let saved = map
                        .get(&key)
                        .ok_or_else(|| bad(format!("no `{key}` tensor")))?;
                    if saved.size() != slot.size() {
                        return Err(bad(format!(
                            "`{key}` has shape {:?}, model needs {:?}",
                            saved.size(),
                            slot.size()
                        )));
                    }
                    slot.copy_(saved);
                }
            }
            Ok(())
        })
    }
}

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to `peak * final_ratio` at
/// `total` steps.
pub fn learning_rate(step: u64, warmup: u64, total: u64, peak: f64, final_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let floor = peak * final_ratio;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module};
    use tch::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        assert!((learning_rate(0, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-9);
        assert!((learning_rate(9, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-9);
        assert!((learning_rate(10, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-9);
        assert!((learning_rate(100, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-9);
        assert!(learning_rate(50, 10, 100, 1.0, 0.1) < learning_rate(30, 10, 100, 1.0, 0.1));
    }

    #[test]
    fn adamw_lowers_a_loss_and_its_state_round_trips() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root() / "lin", 4, 1, Default::default());
        let x = Tensor::randn([32, 4], (Kind::Float, Device::Cpu));
        let y = x.sum_dim_intlist(1, true, Kind::Float);
        let mut opt = AdamW::new(&vs, 0.0);
        let loss = |lin: &nn::Linear| (lin.forward(&x) - &y).square().mean(Kind::Float);
        let before = loss(&lin).double_value(&[]);
        for _ in 0..50 {
            opt.zero_grad();
            loss(&lin).backward();
            opt.step(0.05, 10.0);
        }
        assert!(loss(&lin).double_value(&[]) < before * 0.5);
        // A non-finite gradient leaves the weights finite.
        opt.zero_grad();
        (loss(&lin) * f64::INFINITY).backward();
        opt.step(0.05, 10.0);
        assert_eq!(
            lin.ws.isfinite().all().int64_value(&[]),
            1,
            "weights stayed finite"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();
        let mut other = AdamW::new(&vs, 0.0);
        other.load(&path).unwrap();
        assert_eq!(other.step, 51);
        for (a, b) in opt.slots.iter().zip(&other.slots) {
            assert!(a.2.equal(&b.2) && a.3.equal(&b.3));
        }
    }
}
