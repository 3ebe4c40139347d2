//! The error type of the `towers` crate.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong building, loading or running the towers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value cannot build a network.
    #[error("tower config: `{field}`: {reason}")]
    Config { field: String, reason: String },
    /// A device string is not `auto`, `cpu`, `cuda` or `cuda:N`, or names a missing device.
    #[error("device `{device}`: {reason}")]
    Device { device: String, reason: String },
    /// A model file is missing, corrupt or does not fit the configuration.
    #[error("{}: {reason}", path.display())]
    ModelFile {
        path: std::path::PathBuf,
        reason: String,
    },
    /// libtorch raised an error; with valid inputs this is our bug.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// Reading the prepared data failed.
    #[error(transparent)]
    Data(#[from] features::Error),
    /// The data and the model do not belong together, or the data is unusable.
    #[error("{0}")]
    Mismatch(String),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
