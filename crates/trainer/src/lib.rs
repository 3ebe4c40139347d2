//! # trainer: turns examples into a model people can measure and trust
//!
//! Batches the training examples written by `features`, optimises the two towers with an
//! in-batch softmax (temperature, logQ correction, optional sampled negatives), checkpoints
//! atomically, and evaluates by full ranking over the catalog.
//!
//! Data flow: features → towers → **trainer** (`MODEL_DIR`) → indexer → server.
