//! The error type of the `indexer` crate.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong embedding a catalog, building, publishing or loading an index.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading items or examples failed.
    #[error(transparent)]
    Data(#[from] features::Error),
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] towers::Error),
    /// libtorch raised an error; with valid inputs this is our bug.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// FAISS refused an operation (an unknown factory string, a parameter it does not have).
    #[error("FAISS: {op}: {reason}")]
    Faiss { op: String, reason: String },
    /// The inputs cannot make an index: empty catalog, duplicate ids, nlist above the item count,
    /// a model that does not belong to the items or to the index.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but is not what it should be.
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// A build was stopped on purpose after `stage` (crash-safety tests).
    #[error("stopped after stage `{0}` (injected failure)")]
    Injected(&'static str),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
