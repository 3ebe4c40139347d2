//! The error type of the `trainer` crate.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the prepared data failed.
    #[error(transparent)]
    Data(#[from] features::Error),
    /// Building or loading the model failed.
    #[error(transparent)]
    Model(#[from] towers::Error),
    /// libtorch raised an error; with valid inputs this is our bug.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A setting is invalid.
    #[error("train config: `{field}`: {reason}")]
    Config { field: String, reason: String },
    /// The data and the model do not belong together, or the data cannot train a model.
    #[error("{0}")]
    Mismatch(String),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model or checkpoint file is unreadable.
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
