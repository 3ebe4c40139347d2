//! The one error type of the `features` crate.
//!
//! Every variant carries the facts a user needs to fix their input: the file, and where it
//! applies the row (1-based, counting data rows) and the column.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong while reading, validating or writing data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file system refused an operation.
    #[error("{}: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One value in one row is wrong.
    #[error("{}: row {row}: column `{column}`: {reason}", file.display())]
    BadValue {
        file: PathBuf,
        row: usize,
        column: String,
        reason: String,
    },
    /// A whole column is missing or has the wrong type.
    #[error("{}: column `{column}`: {reason}", file.display())]
    BadColumn {
        file: PathBuf,
        column: String,
        reason: String,
    },
    /// The file as a whole is unusable (empty, not Parquet, wrong table).
    #[error("{}: {reason}", file.display())]
    BadFile { file: PathBuf, reason: String },
    /// Parquet could not decode or encode the file.
    #[error("{}: parquet: {source}", file.display())]
    Parquet {
        file: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// Arrow rejected a batch; when writing, this is our bug rather than the user's.
    #[error("{}: arrow: {source}", file.display())]
    Arrow {
        file: PathBuf,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A packaged dataset could not be fetched or unpacked.
    #[error("dataset `{dataset}`: {reason}")]
    Fetch { dataset: String, reason: String },
    /// A setting (command-line option or config value) is invalid.
    #[error("invalid setting `{setting}`: {reason}")]
    Setting { setting: String, reason: String },
}

impl Error {
    pub fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            file: file.into(),
            source,
        }
    }

    pub fn bad_value(
        file: impl Into<PathBuf>,
        row: usize,
        column: &str,
        reason: impl Into<String>,
    ) -> Self {
        Error::BadValue {
            file: file.into(),
            row,
            column: column.to_string(),
            reason: reason.into(),
        }
    }

    pub fn bad_column(file: impl Into<PathBuf>, column: &str, reason: impl Into<String>) -> Self {
        Error::BadColumn {
            file: file.into(),
            column: column.to_string(),
            reason: reason.into(),
        }
    }

    pub fn bad_file(file: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            file: file.into(),
            reason: reason.into(),
        }
    }

    pub fn setting(setting: &str, reason: impl Into<String>) -> Self {
        Error::Setting {
            setting: setting.to_string(),
            reason: reason.into(),
        }
    }

    pub fn fetch(dataset: &str, reason: impl Into<String>) -> Self {
        Error::Fetch {
            dataset: dataset.to_string(),
            reason: reason.into(),
        }
    }
}
