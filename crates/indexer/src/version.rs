//! A published index version loaded for serving or for `index add`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use features::Embeddings;

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::rerank::Searcher;
use crate::root::{IndexRoot, VersionLayout};
use crate::vector_index::VectorIndex;

/// Everything in `INDEX_ROOT/<version>/`, checked for consistency.
pub struct IndexVersion {
    pub version: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub index: VectorIndex,
    /// The item vectors (what the user tower reads for history items, and `SimilarItems`).
    pub embeddings: Embeddings,
    /// Row of each item id in `embeddings`.
    pub row_of: HashMap<u64, u32>,
}

impl IndexVersion {
    /// Loads the version `CURRENT` names.
    pub fn open_current(root: &Path) -> Result<IndexVersion> {
        let r = IndexRoot::new(root);
        let version = r.current()?.ok_or_else(|| {
            Error::invalid(format!(
                "{}: no CURRENT version; build one with `twotower index`",
                root.display()
            ))
        })?;
        Self::open(root, &version)
    }

    /// Loads one version, checking that index, embeddings and manifest agree.
    pub fn open(root: &Path, version: &str) -> Result<IndexVersion> {
        let dir = IndexRoot::new(root).version_dir(version);
        let files = VersionLayout(dir.clone());
        let manifest = Manifest::load(&files.manifest())?;
        let index = VectorIndex::read(&files.index())?;
        let embeddings = Embeddings::read(&files.embeddings())?;
        let bad = |reason: String| Error::BadFile {
            path: dir.clone(),
            reason,
        };
        if manifest.version != version {
            return Err(bad(format!("manifest names version {}", manifest.version)));
        }
        if index.dim() != manifest.dim || embeddings.dim != manifest.dim {
            return Err(bad(format!(
                "dims differ: manifest {}, index {}, embeddings {}",
                manifest.dim,
                index.dim(),
                embeddings.dim
            )));
        }
        if index.len() != manifest.count || embeddings.len() != manifest.count {
            return Err(bad(format!(
                "counts differ: manifest {}, index {}, embeddings {}",
                manifest.count,
                index.len(),
                embeddings.len()
            )));
        }
        let row_of = embeddings
            .row_of()
            .map_err(|id| bad(format!("item {id} appears twice in embeddings.parquet")))?;
        Ok(IndexVersion {
            version: version.to_string(),
            dir,
            manifest,
            index,
            embeddings,
            row_of,
        })
    }

    /// How this version searches: its index, re-ranked as its manifest says.
    pub fn searcher(&self) -> Searcher<'_> {
        Searcher {
            index: &self.index,
            embeddings: &self.embeddings,
            row_of: &self.row_of,
            factor: self.manifest.rerank,
        }
    }

    /// The items of this version (titles and categories the server returns).
    pub fn items_path(&self) -> PathBuf {
        VersionLayout(self.dir.clone()).items()
    }
}
