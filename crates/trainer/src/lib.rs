//! # trainer: turns examples into a model people can measure and trust
//!
//! Batches the training examples written by `features`, optimises the two towers with an
//! in-batch softmax (temperature, logQ correction, accidental-hit removal, optional sampled
//! negatives), checkpoints atomically every epoch, stops early on validation NDCG@10, and
//! evaluates by full ranking over the catalog against popularity, recent popularity and
//! item-to-item co-occurrence baselines.
//!
//! Data flow: features → towers → **trainer** (`MODEL_DIR`) → indexer → server.

pub mod baselines;
pub mod batches;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cooccurrence;
pub mod error;
pub mod evaluate;
pub mod loss;
pub mod optim;
pub mod parts;
pub mod plot;
pub mod ranking;
pub mod rerank;
pub mod session;
pub mod threads;
pub mod train;

pub use config::{Rerank, TrainConfig};
pub use error::{Error, Result};
pub use evaluate::{evaluate_model, RerankSweep};
pub use train::{train, TrainOptions, TrainReport};
