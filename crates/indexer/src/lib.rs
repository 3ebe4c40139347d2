//! # indexer: from a catalog to a versioned, measured FAISS index
//!
//! Runs the item tower over every item ([`embed`]), builds a FAISS index on inner product
//! ([`vector_index`]), measures its recall against exact search and picks the default nprobe
//! ([`quality`]), and publishes it atomically under `INDEX_ROOT/<version>` with
//! `INDEX_ROOT/CURRENT` naming the served version ([`root`], [`publish`]). New items join a
//! published index without retraining ([`add`]); a catalog too large for one job is embedded in
//! shards and merged ([`build`]). The server loads a version with [`IndexVersion`].
//!
//! Data flow: features → towers → **indexer** (`INDEX_ROOT`) → server.
//!
//! ```no_run
//! # fn main() -> indexer::Result<()> {
//! let version = indexer::IndexVersion::open_current(std::path::Path::new("work/index"))?;
//! let query = version.embeddings.vector(0).to_vec();
//! let hits = version.index.search(&query, 10, None)?;
//! assert_eq!(hits.of(0).next().map(|(id, _)| id), Some(version.embeddings.ids[0]));
//! # Ok(()) }
//! ```

pub mod add;
pub mod build;
pub mod embed;
pub mod error;
pub mod manifest;
pub mod publish;
pub mod quality;
pub mod rerank;
pub mod root;
pub mod vector_index;
pub mod version;

pub use add::{add_items, AddOptions};
pub use build::{build_index, embed_shard, merge_shards, BuildOptions, MergeOptions, ShardInfo};
pub use embed::Shard;
pub use error::{Error, Result};
pub use manifest::Manifest;
pub use publish::{PublishSettings, DEFAULT_TRAIN_PER_CENTROID};
pub use rerank::Searcher;
pub use root::{IndexRoot, VersionLayout};
pub use vector_index::{Hits, Probes, VectorIndex};
pub use version::IndexVersion;
