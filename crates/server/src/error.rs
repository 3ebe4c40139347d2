//! The error type of the `server` crate.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong starting the server or loading what it serves. Request-level problems are
/// `tonic::Status` values built in [`crate::convert`] and [`crate::service`], never this type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the prepared data failed.
    #[error(transparent)]
    Data(#[from] features::Error),
    /// Loading the model failed.
    #[error(transparent)]
    Model(#[from] towers::Error),
    /// Loading or searching the index failed.
    #[error(transparent)]
    Index(#[from] indexer::Error),
    /// libtorch raised an error; with valid inputs this is our bug.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but is not what it should be (a corrupt event log, a bad config file).
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// The model and the index do not belong together, or an index fails its probe query.
    #[error("{0}")]
    Mismatch(String),
    /// A setting is out of range.
    #[error("setting `{setting}`: {reason}")]
    Setting { setting: String, reason: String },
    /// Binding, TLS or serving failed.
    #[error("{0}")]
    Transport(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn setting(setting: &str, reason: impl Into<String>) -> Self {
        Error::Setting {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}
