//! One training session: the model, its optimizer, the batch source and the learning-rate
//! schedule, set up once and stepped one batch at a time: open, step, epoch, checkpoint and
//! restore (`checkpoint.rs`), finish. `train` and `bench train` both run through it, so they
//! measure and train exactly the same step.

use std::sync::Arc;
use std::time::Instant;

use features::Progress;
use tch::{Device, Kind, Tensor};
use towers::artifact::ModelLayout;
use towers::dataset::{Catalog, Dataset, ExampleSet, SeenItems};
use towers::TwoTower;

use crate::batches::{BatchSource, HostBatch, TargetFrequency};
use crate::config::{ItemIdInit, TrainConfig};
use crate::error::{Error, Result};
use crate::loss::{content_alignment_loss, in_batch_softmax_loss, DeviceBatch};
use crate::optim::{learning_rate, AdamW};
use crate::parts::Objective;

/// What one epoch of training did.
#[derive(Debug, Clone, Copy)]
pub struct EpochRun {
    /// Mean training loss over the epoch's steps.
    pub loss: f64,
    /// The learning rate of the last step.
    pub lr: f64,
    pub examples: usize,
    pub seconds: f64,
}

/// Overwrites the model's item-id table (if it has one) with [`cooccurrence_embeddings`] of
/// the training examples.
///
/// [`cooccurrence_embeddings`]: crate::cooccurrence::cooccurrence_embeddings
fn start_ids_from_cooccurrence(model: &mut TwoTower, train: &ExampleSet, catalog: &Catalog) {
    let Some(id_emb) = &mut model.item.id_emb else {
        return;
    };
    let (rows, dim) = (model.config.vocab.item_ids, model.config.item_id_dim);
    let started = Instant::now();
    let code = crate::cooccurrence::cooccurrence_embeddings(train, catalog, rows, dim);
    tch::no_grad(|| id_emb.ws.copy_(&code.to_device(id_emb.ws.device())));
    tracing::info!(
        rows,
        dim,
        seconds = started.elapsed().as_secs_f64(),
        "item ids start from training co-occurrence"
    );
}

/// A model being trained on one dataset's training examples.
pub struct Session {
    pub model: TwoTower,
    pub opt: AdamW,
    pub cfg: TrainConfig,
    pub source: Arc<BatchSource>,
    pub device: Device,
    /// Optimizer steps in one epoch, as [`BatchSource::epoch`] makes them.
    pub steps_per_epoch: u64,
    /// libtorch's and OpenBLAS's thread counts while steps in parts have them at one.
    threads_before_parts: Option<(i32, Option<i32>)>,
}

impl Session {
    /// A fresh model (seeded by `cfg.seed`) and optimizer over `train`, with `cfg.tower`'s
    /// vocabulary sizes already taken from `data`. The item-id table is still random: call
    /// [`Session::start_item_ids`] next, unless a checkpoint is restored instead. `seen` is the
    /// users' earlier items if the caller has loaded them; with `remove_seen_negatives` they are
    /// loaded here otherwise.
    pub fn open(
        data: &Dataset,
        train: Arc<ExampleSet>,
        seen: Option<Arc<SeenItems>>,
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
        let seen = match (cfg.remove_seen_negatives, seen) {
            (false, _) => None,
            (true, Some(seen)) => Some(seen),
            (true, None) => Some(Arc::new(SeenItems::load(
                &data.layout().events(),
                &data.catalog,
            )?)),
        };
        let source = Arc::new(BatchSource {
            freq: Arc::new(TargetFrequency::new(&train, data.catalog.len())),
            train,
            catalog: Arc::clone(&data.catalog),
            negative_pool: Arc::new(data.warm_rows()),
            tower: cfg.tower.clone(),
            batch_size: cfg.batch_size,
            extra_negatives: cfg.extra_negatives,
            parts: if device.is_cuda() {
                1
            } else {
                cfg.cpu_batch_parts
            },
            logq: cfg.logq_correction,
            logq_mixture: cfg.logq_mixture,
            seen,
        });
        let steps_per_epoch = source.batches_per_epoch() as u64;
        Ok(Session {
            model,
            opt,
            cfg,
            source,
            device,
            steps_per_epoch,
            threads_before_parts: None,
        })
    }

    /// Starts the item-id table as `item_id_init` asks (the co-occurrence code, computed from
    /// the training examples; nothing for `random`, which the model already is). Call it right
    /// after [`Session::open`], before anything else draws from the seeded generator, so a run
    /// follows its seed; a resumed run skips it, as its checkpoint holds the table.
    pub fn start_item_ids(&mut self) {
        if self.cfg.item_id_init == ItemIdInit::Cooccurrence {
            let source = Arc::clone(&self.source);
            start_ids_from_cooccurrence(&mut self.model, &source.train, &source.catalog);
        }
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

    /// One optimizer step on `host` at `lr`; returns the batch's loss (still on the device:
    /// reading it forces a sync). A batch in several parts runs them on parallel threads
    /// (`crate::parts`).
    pub fn step(&mut self, host: &HostBatch, lr: f64) -> Tensor {
        let batch = DeviceBatch::new(host, self.device);
        let hits = self.cfg.remove_accidental_hits;
        let alignment = self.cfg.content_alignment;
        if batch.parts.len() > 1 {
            let objective = Objective {
                remove_accidental_hits: hits,
                content_alignment: alignment,
            };
            let threads = self.one_thread_each();
            let params = self.opt.parameters();
            let (loss, grads) = crate::parts::gradients(
                &self.model,
                &params,
                batch,
                objective,
                (self.cfg.seed, self.opt.step),
                threads,
            );
            self.opt.step_with(lr, self.cfg.grad_clip, &grads, threads);
            return loss;
        }
        self.opt.zero_grad();
        let objective = || {
            let loss = in_batch_softmax_loss(&self.model, &batch, hits);
            if alignment > 0.0 {
                loss + content_alignment_loss(&self.model, &batch) * alignment
            } else {
                loss
            }
        };
        let loss = if self.cfg.mixed_precision && self.device.is_cuda() {
            tch::autocast(true, objective)
        } else {
            objective()
        };
        loss.backward();
        self.opt.step(lr, self.cfg.grad_clip);
        loss.detach()
    }

    /// The threads the steps in parts run on: libtorch's intra-op count when the first of them
    /// came. The parts run on threads of their own, each with one libtorch thread and one
    /// OpenBLAS thread, so from the first step in parts on both counts are one, for every
    /// thread (see `threads::on_threads`); [`restore_threads`](Self::restore_threads) puts
    /// them back.
    fn one_thread_each(&mut self) -> usize {
        let (threads, _) = *self.threads_before_parts.get_or_insert_with(|| {
            let before = (tch::get_num_threads(), towers::device::set_blas_threads(1));
            tch::set_num_threads(1);
            before
        });
        threads.max(1) as usize
    }

    /// Puts back the thread counts steps in parts changed, for what runs between epochs
    /// (evaluation's large products use every thread).
    pub fn restore_threads(&mut self) {
        if let Some((threads, blas)) = self.threads_before_parts.take() {
            tch::set_num_threads(threads);
            if let Some(blas) = blas {
                towers::device::set_blas_threads(blas);
            }
        }
    }

    /// One pass over the training examples (epoch `epoch`, 0-based, shuffled by the seed and the
    /// epoch), with progress; fails when the loss is no longer finite.
    pub fn epoch(&mut self, epoch: usize, progress: &dyn Progress) -> Result<EpochRun> {
        let cfg = self.cfg.clone();
        tch::manual_seed((cfg.seed as i64).wrapping_add(1 + epoch as i64));
        let start = Instant::now();
        let (batches, n_batches) = self.source.epoch(cfg.seed, epoch);
        progress.start(
            &format!("epoch {}/{}", epoch + 1, cfg.epochs),
            Some((n_batches * cfg.batch_size).min(self.source.train.len()) as u64),
        );
        let loss_sum = Tensor::zeros([], (Kind::Float, self.device));
        let (mut examples, mut steps) = (0usize, 0u64);
        let mut lr = cfg.lr;
        for host in batches {
            lr = self.lr();
            let loss = self.step(&host, lr);
            let _ = tch::no_grad(|| loss_sum.shallow_clone().g_add_(&loss));
            examples += host.size;
            steps += 1;
            progress.advance(host.size as u64);
            // Reading the loss forces a device sync, so the display updates only now and then.
            if steps % 50 == 0 {
                progress.message(&format!(
                    "loss {:.4}",
                    loss_sum.double_value(&[]) / steps as f64
                ));
            }
        }
        progress.finish();
        self.restore_threads();
        let loss = loss_sum.double_value(&[]) / steps.max(1) as f64;
        if !loss.is_finite() {
            return Err(Error::Mismatch(format!(
                "epoch {}: training loss is {loss}; lower --lr",
                epoch + 1
            )));
        }
        Ok(EpochRun {
            loss,
            lr,
            examples,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Ends the session with the best epoch's weights from `layout`'s checkpoint.
    pub fn finish(self, layout: &ModelLayout) -> Result<TwoTower> {
        let best = layout.checkpoint().join(crate::checkpoint::BEST_WEIGHTS);
        let mut model = self.model;
        model.vs.load(&best).map_err(|e| Error::BadFile {
            path: best.clone(),
            reason: e.to_string(),
        })?;
        Ok(model)
    }
}
