//! The common end of every job that makes a version (build, merge, add): check the vectors,
//! train and fill the FAISS index, measure its recall, write the files into the staging
//! directory, publish, and collect old versions.

use std::path::PathBuf;
use std::time::Instant;

use features::Embeddings;
use rand::SeedableRng;
use towers::LoadedModel;

use crate::error::{Error, Result};
use crate::manifest::{Manifest, ModelRef, StageSeconds, MANIFEST_FORMAT};
use crate::quality::{self, QuerySample};
use crate::rerank::Searcher;
use crate::root::{IndexRoot, VersionLayout};
use crate::vector_index::VectorIndex;

/// Settings shared by the jobs that publish a version.
#[derive(Debug, Clone)]
pub struct PublishSettings {
    /// FAISS factory string; `None` picks `IVF{≈4·√N},Flat`.
    pub factory: Option<String>,
    /// Default nprobe; `None` measures and picks the smallest reaching recall@100 ≥ 0.95.
    pub nprobe: Option<usize>,
    /// Candidates per result re-scored exactly (`indexer::rerank`); `None`: 1 for a new index,
    /// the parent's for `index add`.
    pub rerank: Option<usize>,
    /// Versions to keep (the current one is never deleted).
    pub keep: usize,
    /// Seed of the training sample.
    pub seed: u64,
    /// Vectors per IVF list the quantizer's k-means trains on (a uniform sample of the catalog;
    /// all of it when smaller). FAISS's guidance is 39 to 256; k-means time grows linearly with
    /// it. At 1M items 40 gave the recall@100 of 64 within 0.002 at every nprobe, in two
    /// sessions, and cut the k-means from 39.7 s to 23.0 s on a Zen 3 EPYC (docs/benchmarks.md,
    /// session 28).
    pub train_per_centroid: usize,
    /// Queries used to measure recall.
    pub recall_queries: usize,
    /// Test hook: fail with [`Error::Injected`] right after this stage (`embed`, `train`,
    /// `add`, `write`), to prove that a crash leaves `CURRENT` intact.
    pub fail_after: Option<&'static str>,
}

/// Default of [`PublishSettings::train_per_centroid`].
pub const DEFAULT_TRAIN_PER_CENTROID: usize = 40;

impl Default for PublishSettings {
    fn default() -> Self {
        PublishSettings {
            factory: None,
            nprobe: None,
            rerank: None,
            keep: 3,
            seed: 0,
            train_per_centroid: DEFAULT_TRAIN_PER_CENTROID,
            recall_queries: 1000,
            fail_after: None,
        }
    }
}

impl PublishSettings {
    pub(crate) fn checkpoint(&self, stage: &'static str) -> Result<()> {
        if self.fail_after == Some(stage) {
            return Err(Error::Injected(stage));
        }
        Ok(())
    }
}

/// The default factory for `n` items: about 4·√n inverted lists, each a flat list of vectors.
pub fn default_factory(n: usize) -> String {
    let nlist = ((4.0 * (n as f64).sqrt()).round() as usize).clamp(1, n.max(1));
    format!("IVF{nlist},Flat")
}

/// The nlist a factory string asks for (`IVF4096,SQ8` → 4096).
pub fn factory_nlist(factory: &str) -> Option<usize> {
    let start = factory.find("IVF")? + 3;
    let digits: String = factory[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Where the index comes from.
pub enum IndexPlan {
    /// Build from a factory string and train on a sample.
    Fresh,
    /// Refill an already trained index (`index add`: no retraining).
    Reuse(VectorIndex),
}

/// What a job hands to [`publish_version`].
pub struct Staged<'a> {
    pub root: &'a IndexRoot,
    pub version: String,
    pub dir: PathBuf,
    pub embeddings: Embeddings,
    /// Where the items came from (for messages).
    pub source: PathBuf,
    pub model: &'a LoadedModel,
    pub parent: Option<String>,
    /// Validation examples to draw user queries from, when there are any.
    pub valid_examples: Option<PathBuf>,
    pub vocabs: &'a features::Vocabularies,
    pub seconds: StageSeconds,
}

/// Checks, fills, measures, writes and publishes a staged version.
pub fn publish_version(
    mut staged: Staged<'_>,
    plan: IndexPlan,
    settings: &PublishSettings,
) -> Result<Manifest> {
    let emb = &staged.embeddings;
    let n = emb.len();
    if n == 0 {
        return Err(Error::invalid(format!(
            "empty catalog: {} has no items to index",
            staged.source.display()
        )));
    }
    if let Some(id) = emb
        .ids
        .iter()
        .find(|&&id| id > features::table::MAX_ITEM_ID)
    {
        return Err(Error::invalid(format!(
            "item id {id} in {} is above {}, the largest id FAISS can store",
            staged.source.display(),
            features::table::MAX_ITEM_ID
        )));
    }
    let row_of = emb.row_of().map_err(|id| {
        Error::invalid(format!(
            "duplicate item id {id} in {}: every item must appear once",
            staged.source.display()
        ))
    })?;

    let parent = match &plan {
        IndexPlan::Fresh => None,
        IndexPlan::Reuse(_) => Some(parent_manifest(&staged)?),
    };
    let rerank = settings
        .rerank
        .or(parent.as_ref().map(|m| m.rerank))
        .unwrap_or(1)
        .max(1);
    let (mut index, factory, train_vectors) = match plan {
        IndexPlan::Fresh => {
            let factory = settings
                .factory
                .clone()
                .unwrap_or_else(|| default_factory(n));
            if let Some(nlist) = factory_nlist(&factory) {
                if nlist == 0 || nlist > n {
                    return Err(Error::invalid(format!(
                        "factory `{factory}`: nlist {nlist} must be between 1 and the {n} items (the default for this catalog is `{}`)",
                        default_factory(n)
                    )));
                }
            }
            let mut index = VectorIndex::new(&factory, emb.dim)?;
            let start = Instant::now();
            let mut used = 0;
            if index.needs_training() {
                let sample = training_sample(
                    emb,
                    factory_nlist(&factory),
                    settings.train_per_centroid,
                    settings.seed,
                );
                used = sample.len() / emb.dim;
                tracing::info!(vectors = used, factory = %factory, "training the index");
                index.train(&sample)?;
            }
            staged.seconds.train = start.elapsed().as_secs_f64();
            (index, factory, used)
        }
        IndexPlan::Reuse(mut index) => {
            if index.dim() != emb.dim {
                return Err(Error::invalid(format!(
                    "the index has dim {}, the model makes vectors of dim {}",
                    index.dim(),
                    emb.dim
                )));
            }
            index.reset()?;
            (index, String::new(), 0)
        }
    };
    settings.checkpoint("train")?;

    let start = Instant::now();
    for (ids, vectors) in emb
        .ids
        .chunks(65_536)
        .zip(emb.vectors.chunks(65_536 * emb.dim))
    {
        index.add(ids, vectors)?;
    }
    staged.seconds.add = start.elapsed().as_secs_f64();
    settings.checkpoint("add")?;

    let start = Instant::now();
    let queries = query_sample(&staged, &row_of, settings.recall_queries)?;
    let exact = quality::exact_hits(emb, &queries.vectors, 100)?;
    let searcher = Searcher {
        index: &index,
        embeddings: emb,
        row_of: &row_of,
        factor: rerank,
    };
    let (chosen, tried) = quality::choose_nprobe(&searcher, &queries, &exact, settings.nprobe)?;
    if index.nlist().is_some() {
        index.set_default_nprobe(chosen.nprobe)?;
    }
    staged.seconds.measure = start.elapsed().as_secs_f64();
    tracing::info!(
        nprobe = chosen.nprobe,
        recall_at_10 = chosen.recall_at_10,
        recall_at_100 = chosen.recall_at_100,
        rerank,
        queries = queries.kind,
        "measured recall against exact search"
    );

    let start = Instant::now();
    let files = VersionLayout(staged.dir.clone());
    let index_path = files.index();
    index.write(&index_path)?;
    emb.write(&files.embeddings())?;
    settings.checkpoint("write")?;
    staged.seconds.write = start.elapsed().as_secs_f64();

    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: staged.version.clone(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        parent: staged.parent.clone(),
        model: ModelRef::of(staged.model),
        dim: emb.dim,
        metric: "inner_product".into(),
        count: n,
        factory: match parent {
            Some(p) if factory.is_empty() => p.factory,
            _ => factory,
        },
        nlist: index.nlist(),
        nprobe: index.default_nprobe(),
        rerank,
        train_vectors,
        recall_at_10_vs_exact: chosen.recall_at_10,
        recall_at_100_vs_exact: chosen.recall_at_100,
        recall_queries: queries.kind.into(),
        recall_query_count: queries.count,
        recall_by_nprobe: tried,
        seconds: staged.seconds.clone(),
        index_bytes: std::fs::metadata(&index_path)
            .map_err(|e| Error::io(&index_path, e))?
            .len(),
    };
    manifest.write(&VersionLayout(staged.dir.clone()).manifest())?;
    let dir = staged.root.publish(&staged.dir, &staged.version)?;
    // Published: a failed clean-up must not turn the job into a failure.
    match staged.root.collect_garbage(settings.keep) {
        Ok(removed) => {
            tracing::info!(version = %manifest.version, dir = %dir.display(), removed = removed.len(), "published")
        }
        Err(e) => {
            tracing::warn!(version = %manifest.version, "published, but old versions were not collected: {e}")
        }
    }
    Ok(manifest)
}

fn query_sample(
    staged: &Staged<'_>,
    row_of: &std::collections::HashMap<u64, u32>,
    max: usize,
) -> Result<QuerySample> {
    if let Some(path) = staged.valid_examples.as_ref().filter(|p| p.is_file()) {
        match quality::user_queries(
            &staged.model.model,
            staged.vocabs,
            path,
            &staged.embeddings,
            row_of,
            max,
        ) {
            Ok(Some(sample)) => return Ok(sample),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "cannot use {} as recall queries ({e}); using item vectors",
                path.display()
            ),
        }
    }
    Ok(quality::item_queries(&staged.embeddings, max))
}

fn parent_manifest(staged: &Staged<'_>) -> Result<Manifest> {
    let parent = staged.parent.as_deref().unwrap_or_default();
    Manifest::load(&VersionLayout(staged.root.version_dir(parent)).manifest())
}

/// A uniform sample of at most 256·nlist vectors (all of them when the catalog is smaller):
/// FAISS's k-means gains nothing from more, and training time grows with the sample.
fn training_sample(
    emb: &Embeddings,
    nlist: Option<usize>,
    per_centroid: usize,
    seed: u64,
) -> Vec<f32> {
    let cap = per_centroid.max(1) * nlist.unwrap_or(256).max(1);
    if emb.len() <= cap {
        return emb.vectors.clone();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rows = rand::seq::index::sample(&mut rng, emb.len(), cap).into_vec();
    rows.sort_unstable();
    let mut out = Vec::with_capacity(cap * emb.dim);
    for r in rows {
        out.extend_from_slice(emb.vector(r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_factory_grows_with_the_square_root() {
        assert_eq!(default_factory(1), "IVF1,Flat");
        assert_eq!(default_factory(1682), "IVF164,Flat");
        assert_eq!(default_factory(1_000_000), "IVF4000,Flat");
        assert_eq!(factory_nlist("OPQ16_64,IVF4096,PQ16np"), Some(4096));
        assert_eq!(factory_nlist("HNSW32"), None);
    }
}
