//! `twotower bench train`: training throughput, the model's arithmetic per example, and how far
//! the measured rate is from what the machine's matrix multiply can do.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use features::splits::Split;
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use towers::TowerConfig;

use crate::session::Session;

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use towers::dataset::Dataset;

/// The JSON report of `twotower bench train`.
#[derive(Debug, Serialize)]
pub struct TrainBench {
    pub device: String,
    pub threads: i32,
    pub batch_size: usize,
    /// bf16/fp16 autocast on CUDA (`mixed_precision` in the training settings).
    pub mixed_precision: bool,
    pub steps: usize,
    pub examples_per_sec: f64,
    /// Mean distinct items per batch (each runs the item tower once).
    pub unique_items_per_batch: f64,
    /// Mean history length per example.
    pub history_per_example: f64,
    /// Forward + backward floating-point operations per training example (analytic count).
    pub flops_per_example: f64,
    pub achieved_gflops: f64,
    /// A large float32 matmul on the same device: the practical peak.
    pub matmul_gflops: f64,
    /// achieved / matmul peak.
    pub fraction_of_peak: f64,
}

/// Forward FLOPs of the towers for one example, from the architecture: the item MLP for each
/// distinct item, the GRU for each history slot, the query projection for the `searches` share
/// of them (batches without searches skip it), the user MLP, and the logits against
/// `candidates`. Embedding lookups and element-wise work are left out.
pub fn forward_flops(
    cfg: &TowerConfig,
    history: f64,
    searches: f64,
    items_per_example: f64,
    candidates: f64,
) -> f64 {
    let mlp = |input: i64, hidden: &[i64], out: i64| -> f64 {
        let mut prev = input;
        let mut f = 0.0;
        for &w in hidden.iter().chain(std::iter::once(&out)) {
            f += 2.0 * (prev * w) as f64;
            prev = w;
        }
        f
    };
    let item = mlp(
        cfg.token_dim + cfg.aspect_dim + cfg.category_dim,
        &cfg.item_hidden,
        cfg.dim,
    );
    let gru_in = cfg.dim + cfg.event_type_dim + cfg.gap_dim;
    let gru_step = 2.0 * 3.0 * ((gru_in + cfg.gru_hidden) * cfg.gru_hidden) as f64;
    let query = 2.0 * (cfg.token_dim * cfg.dim) as f64;
    let user = mlp(
        cfg.gru_hidden + 2 * cfg.context_dim + cfg.user_feature_dim,
        &cfg.user_hidden,
        cfg.dim,
    );
    items_per_example * item
        + history * (gru_step + searches * query)
        + user
        + 2.0 * candidates * cfg.dim as f64
}

/// GFLOP/s of a 1024×1024 float32 matmul on `device`.
pub fn matmul_gflops(device: Device) -> f64 {
    let n = 1024i64;
    let a = Tensor::randn([n, n], (Kind::Float, device));
    let b = Tensor::randn([n, n], (Kind::Float, device));
    let _ = a.matmul(&b).sum(Kind::Float).double_value(&[]); // warm up
    let reps = 20;
    let start = Instant::now();
    let mut acc = Tensor::zeros([], (Kind::Float, device));
    for _ in 0..reps {
        acc += a.matmul(&b).sum(Kind::Float);
    }
    let _ = acc.double_value(&[]);
    reps as f64 * 2.0 * (n * n * n) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// Runs `steps` training steps (after `warmup` untimed ones) on `data_dir`'s training examples.
pub fn bench_train(
    data_dir: &Path,
    mut cfg: TrainConfig,
    device: Device,
    warmup: usize,
    steps: usize,
) -> Result<TrainBench> {
    cfg.validate()?;
    let data = Dataset::open(data_dir)?;
    cfg.tower.vocab = data.vocab_sizes();
    let train = Arc::new(data.examples(Split::Train, &cfg.tower)?);
    if train.len() < cfg.batch_size {
        return Err(Error::Mismatch(format!(
            "{} training examples, fewer than one batch",
            train.len()
        )));
    }
    let mut session = Session::open(&data, Arc::clone(&train), None, cfg.clone(), device)?;
    session.start_item_ids();
    let (mut timed, mut examples, mut unique, mut history) = (0usize, 0usize, 0.0, 0.0);
    let mut start = Instant::now();
    let mut epoch = 0;
    let last = Tensor::zeros([], (Kind::Float, device));
    'outer: loop {
        let (batches, _) = session.source.epoch(cfg.seed, epoch);
        epoch += 1;
        for host in batches {
            let loss = session.step(&host, cfg.lr);
            tch::no_grad(|| last.shallow_clone().copy_(&loss));
            timed += 1;
            if timed == warmup {
                let _ = last.double_value(&[]);
                start = Instant::now();
            }
            if timed > warmup {
                examples += host.size;
                unique += host.items.len() as f64;
                history += host.history_events() as f64;
            }
            if timed == warmup + steps {
                break 'outer;
            }
        }
    }
    let _ = last.double_value(&[]);
    let seconds = start.elapsed().as_secs_f64();
    session.restore_threads();
    let examples_per_sec = examples as f64 / seconds;
    let unique_per_batch = unique / steps as f64;
    let history_per_example = history / examples as f64;
    let candidates = (cfg.batch_size + cfg.extra_negatives) as f64;
    let events = train
        .examples
        .iter()
        .map(|e| e.history.len())
        .sum::<usize>()
        .max(1);
    let searches = train
        .examples
        .iter()
        .flat_map(|e| &e.history)
        .filter(|h| h.query != towers::dataset::NONE)
        .count();
    let forward = forward_flops(
        &cfg.tower,
        history_per_example,
        searches as f64 / events as f64,
        unique_per_batch / cfg.batch_size as f64,
        candidates,
    );
    // Backward costs about twice the forward pass.
    let flops_per_example = 3.0 * forward;
    let achieved_gflops = flops_per_example * examples_per_sec / 1e9;
    let peak = matmul_gflops(device);
    Ok(TrainBench {
        device: towers::device_name(device),
        threads: tch::get_num_threads(),
        batch_size: cfg.batch_size,
        mixed_precision: cfg.mixed_precision && device.is_cuda(),
        steps,
        examples_per_sec,
        unique_items_per_batch: unique_per_batch,
        history_per_example,
        flops_per_example,
        achieved_gflops,
        matmul_gflops: peak,
        fraction_of_peak: achieved_gflops / peak,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_count_grows_with_history_and_width() {
        let cfg = TowerConfig::default();
        let short = forward_flops(&cfg, 10.0, 1.0, 1.0, 256.0);
        let long = forward_flops(&cfg, 50.0, 1.0, 1.0, 256.0);
        assert!(long > short * 3.0);
        let wide = TowerConfig {
            gru_hidden: 256,
            ..TowerConfig::default()
        };
        assert!(forward_flops(&wide, 50.0, 1.0, 1.0, 256.0) > long);
        // One GRU step of the default config: 6 * (96 + 128) * 128 multiply-adds.
        let one = forward_flops(&cfg, 1.0, 1.0, 0.0, 0.0) - forward_flops(&cfg, 0.0, 1.0, 0.0, 0.0);
        assert_eq!(one, 6.0 * ((96 + 128) * 128) as f64 + 2.0 * 64.0 * 64.0);
    }
}
