//! A training session's checkpoint: weights, optimizer state and the run's progress, written
//! atomically after every epoch into `MODEL_DIR/checkpoint`, so that `--resume` continues after
//! the last completed epoch and a crash never leaves half a checkpoint.

use serde::{Deserialize, Serialize};
use towers::artifact::ModelLayout;

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::session::Session;
use crate::train::EpochLog;
use features::fsutil::write_json;

/// Progress of a run, saved in every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// Epochs completed (the next epoch to run).
    pub epochs_done: usize,
    pub best_epoch: usize,
    pub best_ndcg: f64,
    pub log: Vec<EpochLog>,
    /// The settings the run started with; `--resume` refuses different ones.
    pub config: TrainConfig,
}

/// The weights of the best epoch so far, inside a checkpoint directory.
pub const BEST_WEIGHTS: &str = "best.safetensors";

impl Session {
    /// Saves the model, the optimizer and `state` as `layout`'s checkpoint; `improved` says this
    /// epoch is the best so far (its weights become the best ones).
    pub fn checkpoint(&self, layout: &ModelLayout, state: &RunState, improved: bool) -> Result<()> {
        let dir = layout.checkpoint();
        let tmp = layout.0.join(".checkpoint.tmp");
        let old = layout.0.join(".checkpoint.old");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        self.model.save(&tmp.join("weights.safetensors"))?;
        self.opt.save(&tmp.join("optimizer.safetensors"))?;
        let best = tmp.join(BEST_WEIGHTS);
        if improved {
            self.model.save(&best)?;
        } else {
            std::fs::copy(dir.join(BEST_WEIGHTS), &best).map_err(|e| Error::io(&best, e))?;
        }
        write_json(&tmp.join("state.json"), state)?;
        // Swap directories so that either the previous or the new checkpoint is complete at any
        // time.
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(&dir, &old).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        features::fsutil::sync_parent(&dir)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Loads `layout`'s checkpoint into the model and optimizer and returns the run's progress
    /// (with this session's epoch count), or `None` when there is none. A checkpoint made with
    /// other settings (besides the number of epochs) is refused.
    pub fn restore(&mut self, layout: &ModelLayout) -> Result<Option<RunState>> {
        let dir = layout.checkpoint();
        if !dir.exists() {
            // A crash between the two renames of `checkpoint` leaves the previous one here: put
            // it back where the rest of the run expects it.
            let old = layout.0.join(".checkpoint.old");
            if !old.exists() {
                return Ok(None);
            }
            std::fs::rename(&old, &dir).map_err(|e| Error::io(&dir, e))?;
        }
        let state_path = dir.join("state.json");
        let bytes = std::fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let mut state: RunState = serde_json::from_slice(&bytes).map_err(|e| Error::BadFile {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;
        if !same_run(&state.config, &self.cfg) {
            return Err(Error::Mismatch(format!(
                "{}: the checkpoint was made with different settings; train into a new directory or drop --resume",
                dir.display()
            )));
        }
        let weights = dir.join("weights.safetensors");
        self.model.vs.load(&weights).map_err(|e| Error::BadFile {
            path: weights,
            reason: e.to_string(),
        })?;
        self.opt.load(&dir.join("optimizer.safetensors"))?;
        state.config.epochs = self.cfg.epochs;
        Ok(Some(state))
    }
}

/// Two configs describe the same run if they differ at most in the number of epochs.
fn same_run(a: &TrainConfig, b: &TrainConfig) -> bool {
    TrainConfig {
        epochs: 0,
        ..a.clone()
    } == TrainConfig {
        epochs: 0,
        ..b.clone()
    }
}
