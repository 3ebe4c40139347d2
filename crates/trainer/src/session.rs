//! One training session: the model, its optimizer, the batch source and the learning-rate
//! schedule, set up once and stepped one batch at a time. `train` and `bench train` both run
//! through it, so they measure and train exactly the same step.

use std::sync::Arc;

use tch::{Device, Tensor};
use towers::dataset::{Dataset, ExampleSet};
use towers::TwoTower;

use crate::batches::{BatchSource, HostBatch, TargetFrequency};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::loss::{in_batch_softmax_loss, DeviceBatch};
use crate::optim::{learning_rate, AdamW};

/// A model being trained on one dataset's training examples.
pub struct Session {
    pub model: TwoTower,
    pub opt: AdamW,
    pub cfg: TrainConfig,
    pub source: Arc<BatchSource>,
    pub device: Device,
    /// Optimizer steps in one epoch, as [`BatchSource::epoch`] makes them.
    pub steps_per_epoch: u64,
}

impl Session {
    /// A fresh model (seeded by `cfg.seed`) and optimizer over `train`, with `cfg.tower`'s
    /// vocabulary sizes already taken from `data`.
    pub fn open(
        data: &Dataset,
        train: Arc<ExampleSet>,
        cfg: TrainConfig,
        device: Device,
    ) -> Result<Session> {
        if train.len() < 2 {
            return Err(Error::Mismatch(format!(
                "{}: {} training examples; at least 2 are needed",
                data.layout()
                    .split(features::splits::Split::Train)
                    .display(),
                train.len()
            )));
        }
        tch::manual_seed(cfg.seed as i64);
        let model = TwoTower::new(cfg.tower.clone(), device)?;
        let opt = AdamW::new(&model.vs, cfg.weight_decay);
        let source = Arc::new(BatchSource {
            freq: Arc::new(TargetFrequency::new(&train, data.catalog.len())),
            train,
            catalog: Arc::clone(&data.catalog),
            negative_pool: Arc::new(data.warm_rows()),
            tower: cfg.tower.clone(),
            batch_size: cfg.batch_size,
            extra_negatives: cfg.extra_negatives,
            logq: cfg.logq_correction,
        });
        let steps_per_epoch = source.batches_per_epoch() as u64;
        Ok(Session {
            model,
            opt,
            cfg,
            source,
            device,
            steps_per_epoch,
        })
    }

    /// The learning rate of the next step (warm-up, then cosine decay over every epoch).
    pub fn lr(&self) -> f64 {
        let c = &self.cfg;
        let total = self.steps_per_epoch * c.epochs as u64;
        learning_rate(
            self.opt.step,
            c.warmup_steps as u64,
            total,
            c.lr,
            c.final_lr_ratio,
        )
    }

    /// One optimizer step on `host` at `lr`; returns the batch's loss (still on the device: reading
    /// it forces a sync) and the batch as moved to the device.
    pub fn step(&mut self, host: &HostBatch, lr: f64) -> (Tensor, DeviceBatch) {
        let batch = DeviceBatch::new(host, self.device);
        self.opt.zero_grad();
        let hits = self.cfg.remove_accidental_hits;
        let loss = if self.cfg.mixed_precision && self.device.is_cuda() {
            tch::autocast(true, || in_batch_softmax_loss(&self.model, &batch, hits))
        } else {
            in_batch_softmax_loss(&self.model, &batch, hits)
        };
        loss.backward();
        self.opt.step(lr, self.cfg.grad_clip);
        (loss.detach(), batch)
    }
}
