//! Progress reporting that library code can call without knowing how it is displayed.
//!
//! The CLI implements [`Progress`] with indicatif bars; tests and library users pass
//! [`NoProgress`]. Long jobs in every crate report through this one trait.

/// Receives progress from a long-running job.
pub trait Progress: Sync {
    /// A new stage starts; `total` is the number of units, when known.
    fn start(&self, stage: &str, total: Option<u64>);
    /// `n` more units of the current stage are done.
    fn advance(&self, n: u64);
    /// Sets a short message next to the bar (e.g. the current loss).
    fn message(&self, _msg: &str) {}
    /// The current stage is done.
    fn finish(&self);
}

/// Discards all progress.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _stage: &str, _total: Option<u64>) {}
    fn advance(&self, _n: u64) {}
    fn finish(&self) {}
}
