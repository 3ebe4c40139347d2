//! Tokenization and vocabularies: the same code turns text into ids for training, indexing and
//! serving.
//!
//! Ids are laid out as `0` = padding, `1..=n` = the vocabulary (most frequent first), then
//! `hash_buckets` ids for words outside it. Hashing unseen words into buckets (rather than one
//! `<unk>`) lets a brand-new item's unseen title words still carry signal that the model can
//! share across items — the cold-start property the item tower is built for.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Lowercases (Unicode-aware) and splits into words at every character that is not
/// alphanumeric. `"Toy Story (1995)"` gives `["toy", "story", "1995"]`.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// 64-bit FNV-1a: stable across runs, machines and Rust versions, unlike `std`'s hasher.
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// SplitMix64 finalizer: spreads FNV's weak high bits so that thresholds on the whole 64-bit
/// value (as in the cold-item draw) are fair.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A frozen token → id mapping with hashed out-of-vocabulary buckets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vocab {
    /// What the vocabulary is for (`title`, `aspects`, `categories`, `user_features`).
    pub name: String,
    /// Tokens seen fewer times than this in training data were left out.
    pub min_count: u32,
    /// Ids reserved for tokens outside the vocabulary (at least 1).
    pub hash_buckets: u32,
    /// Known tokens, id `i + 1` for `tokens[i]`.
    pub tokens: Vec<String>,
    #[serde(skip)]
    index: HashMap<String, u32>,
}

impl Vocab {
    /// Builds from token counts: keeps tokens seen at least `min_count` times, most frequent
    /// first, ties broken alphabetically so the result is deterministic.
    pub fn from_counts(
        name: &str,
        counts: HashMap<String, u64>,
        min_count: u32,
        hash_buckets: u32,
    ) -> Vocab {
        let mut kept: Vec<(String, u64)> = counts
            .into_iter()
            .filter(|(_, c)| *c >= min_count as u64)
            .collect();
        kept.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let tokens = kept.into_iter().map(|(t, _)| t).collect();
        Vocab::new(name, tokens, min_count, hash_buckets)
    }

    fn new(name: &str, tokens: Vec<String>, min_count: u32, hash_buckets: u32) -> Vocab {
        let mut v = Vocab {
            name: name.to_string(),
            min_count,
            hash_buckets: hash_buckets.max(1),
            tokens,
            index: HashMap::new(),
        };
        v.reindex();
        v
    }

    fn reindex(&mut self) {
        self.index = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32 + 1))
            .collect();
    }

    /// Id of a token: its vocabulary id, or a hash bucket when unknown. Never 0 (padding).
    pub fn id(&self, token: &str) -> i64 {
        match self.index.get(token) {
            Some(&id) => id as i64,
            None => {
                self.tokens.len() as i64
                    + 1
                    + (stable_hash(token) % self.hash_buckets as u64) as i64
            }
        }
    }

    /// Id of a token in the vocabulary, or 0 when unknown: for tables where an unknown token
    /// must carry no signal at all (item ids: a new item is embedded from its content alone).
    pub fn known_id(&self, token: &str) -> i64 {
        self.index.get(token).map_or(0, |&id| id as i64)
    }

    /// Whether the token has its own id (rather than a hash bucket).
    pub fn contains(&self, token: &str) -> bool {
        self.index.contains_key(token)
    }

    /// Rows an embedding table needs: padding + vocabulary + buckets.
    pub fn size(&self) -> i64 {
        1 + self.tokens.len() as i64 + self.hash_buckets as i64
    }
}

/// Counts tokens while reading training data.
#[derive(Debug, Default)]
pub struct Counter(HashMap<String, u64>);

impl Counter {
    pub fn add(&mut self, token: impl Into<String>) {
        *self.0.entry(token.into()).or_default() += 1;
    }
    pub fn into_vocab(self, name: &str, min_count: u32, hash_buckets: u32) -> Vocab {
        Vocab::from_counts(name, self.0, min_count, hash_buckets)
    }
}

/// Settings of the vocabularies, recorded in `dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VocabConfig {
    /// Minimum count for a title or query word to get its own id.
    pub min_count: u32,
    /// Hash buckets for unseen title and query words.
    pub title_buckets: u32,
}

impl Default for VocabConfig {
    fn default() -> Self {
        VocabConfig {
            min_count: 2,
            title_buckets: 4096,
        }
    }
}

/// The vocabularies of a dataset, and the checksum later stages verify.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocabularies {
    /// Title and search-query words (queries share the title space).
    pub title: Vocab,
    /// Whole `name:value` aspect strings.
    pub aspects: Vocab,
    /// Category names.
    pub categories: Vocab,
    /// Whole `name:value` user features.
    pub user_features: Vocab,
    /// Ids of the items seen in training examples (as decimal strings), most frequent first:
    /// the rows of the item tower's id embedding. Any other item gets id 0 (content only).
    /// Empty for datasets prepared before item ids were recorded.
    pub item_ids: Vocab,
}

/// The ids of one item's content, unpadded, and its item-id row (0: not seen in training).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ItemTokens {
    pub title: Vec<i64>,
    pub aspects: Vec<i64>,
    pub categories: Vec<i64>,
    pub id: i64,
}

const VOCAB_FILES: [&str; 5] = [
    "title",
    "aspects",
    "categories",
    "user_features",
    "item_ids",
];
/// Vocabularies that older data directories do not have; they load as empty.
const OPTIONAL_VOCAB_FILES: [&str; 1] = ["item_ids"];

#[derive(Serialize, Deserialize)]
struct Checksums {
    /// sha256 of the vocabulary as a whole: what model and index manifests record.
    checksum: String,
    files: BTreeMap<String, String>,
}

impl Vocabularies {
    /// The ids of an item's title words, aspects and categories, and of the item itself.
    pub fn item_tokens(
        &self,
        item_id: u64,
        title: &str,
        aspects: &[String],
        categories: &[String],
    ) -> ItemTokens {
        ItemTokens {
            id: self.item_ids.known_id(&item_id.to_string()),
            title: words(title).map(|w| self.title.id(&w)).collect(),
            aspects: aspects
                .iter()
                .map(|a| self.aspects.id(&a.to_lowercase()))
                .collect(),
            categories: categories
                .iter()
                .map(|c| self.categories.id(&c.to_lowercase()))
                .collect(),
        }
    }

    /// The ids of a search query's words.
    pub fn query_tokens(&self, query: &str) -> Vec<i64> {
        words(query).map(|w| self.title.id(&w)).collect()
    }

    /// The ids of a user's features.
    pub fn user_feature_ids(&self, features: &[String]) -> Vec<i64> {
        features
            .iter()
            .map(|f| self.user_features.id(&f.to_lowercase()))
            .collect()
    }

    fn all(&self) -> [&Vocab; 5] {
        [
            &self.title,
            &self.aspects,
            &self.categories,
            &self.user_features,
            &self.item_ids,
        ]
    }

    /// Writes `dir/<name>.json` for each vocabulary and `dir/checksums.json`. Returns the checksum.
    pub fn save(&self, dir: &Path) -> Result<String> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut files = BTreeMap::new();
        let mut whole = Sha256::new();
        for (name, vocab) in VOCAB_FILES.iter().zip(self.all()) {
            let bytes = serde_json::to_vec(vocab).expect("vocab serializes");
            let path = dir.join(format!("{name}.json"));
            crate::fsutil::write_atomic(&path, &bytes)?;
            let sum = hex::encode(Sha256::digest(&bytes));
            whole.update(name.as_bytes());
            whole.update(sum.as_bytes());
            files.insert(name.to_string(), sum);
        }
        let checksum = hex::encode(whole.finalize());
        let manifest = Checksums {
            checksum: checksum.clone(),
            files,
        };
        crate::fsutil::write_json(&dir.join("checksums.json"), &manifest)?;
        Ok(checksum)
    }

    /// Loads and verifies the vocabularies in `dir`. Returns them with their checksum.
    pub fn load(dir: &Path) -> Result<(Vocabularies, String)> {
        let manifest_path = dir.join("checksums.json");
        let manifest: Checksums = read_json(&manifest_path)?;
        let mut vocabs = Vec::new();
        for name in VOCAB_FILES {
            if OPTIONAL_VOCAB_FILES.contains(&name) && !manifest.files.contains_key(name) {
                vocabs.push(Vocab::new(name, Vec::new(), 1, 1));
                continue;
            }
            let path = dir.join(format!("{name}.json"));
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let sum = hex::encode(Sha256::digest(&bytes));
            if manifest.files.get(name) != Some(&sum) {
                return Err(Error::bad_file(
                    &path,
                    format!("checksum {sum} does not match {}", manifest_path.display()),
                ));
            }
            let mut vocab: Vocab = serde_json::from_slice(&bytes)
                .map_err(|e| Error::bad_file(&path, e.to_string()))?;
            if vocab.hash_buckets == 0 {
                return Err(Error::bad_file(&path, "hash_buckets must be at least 1"));
            }
            vocab.reindex();
            vocabs.push(vocab);
        }
        let [title, aspects, categories, user_features, item_ids]: [Vocab; 5] =
            vocabs.try_into().expect("five vocabularies");
        Ok((
            Vocabularies {
                title,
                aspects,
                categories,
                user_features,
                item_ids,
            },
            manifest.checksum,
        ))
    }
}

/// Reads and parses a JSON file, naming it in any error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(words_in: &[&str], min_count: u32, buckets: u32) -> Vocab {
        let mut c = Counter::default();
        for w in words_in {
            c.add(*w);
        }
        c.into_vocab("title", min_count, buckets)
    }

    #[test]
    fn words_are_lowercased_and_split_unicode_aware() {
        let w: Vec<_> = words("Toy Story (1995)").collect();
        assert_eq!(w, ["toy", "story", "1995"]);
        let w: Vec<_> = words("Amélie—ÉCOLE straße ΣΊΣΥΦΟΣ").collect();
        assert_eq!(w, ["amélie", "école", "straße", "σίσυφος"]);
        assert_eq!(words("  ,, ").count(), 0);
    }

    #[test]
    fn vocabulary_is_deterministic_and_frequency_ordered() {
        let a = vocab(&["b", "a", "b", "c", "a", "b"], 1, 8);
        let b = vocab(&["c", "b", "a", "a", "b", "b"], 1, 8);
        assert_eq!(a, b);
        assert_eq!(a.tokens, ["b", "a", "c"]);
        assert_eq!(a.id("b"), 1);
        assert_eq!(a.size(), 1 + 3 + 8);
    }

    #[test]
    fn unseen_and_rare_words_map_to_stable_buckets() {
        let v = vocab(&["shoe", "shoe", "rare"], 2, 16);
        assert!(v.contains("shoe") && !v.contains("rare"));
        for w in ["rare", "zanzibar", "ünïcode"] {
            let id = v.id(w);
            assert!(id > v.tokens.len() as i64 && id < v.size(), "{w} -> {id}");
            assert_eq!(id, v.id(w), "same word, same bucket");
        }
        // Different unseen words spread over buckets rather than collapsing to one id.
        let ids: std::collections::HashSet<_> = (0..100).map(|i| v.id(&format!("w{i}"))).collect();
        assert!(ids.len() > 8, "{ids:?}");
    }

    #[test]
    fn vocabularies_saved_before_item_ids_load_with_none() {
        let dir = tempfile::tempdir().unwrap();
        let vocabs = Vocabularies {
            title: vocab(&["a"], 1, 4),
            aspects: vocab(&["brand:x"], 1, 1),
            categories: vocab(&["shoes"], 1, 1),
            user_features: vocab(&["age:1"], 1, 1),
            item_ids: vocab(&["7"], 1, 1),
        };
        vocabs.save(dir.path()).unwrap();
        // An older data directory: no item_ids.json, and no entry for it in checksums.json.
        std::fs::remove_file(dir.path().join("item_ids.json")).unwrap();
        let path = dir.path().join("checksums.json");
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        manifest["files"]
            .as_object_mut()
            .unwrap()
            .remove("item_ids");
        std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        let (back, _) = Vocabularies::load(dir.path()).unwrap();
        assert!(back.item_ids.tokens.is_empty());
        assert_eq!(back.item_tokens(7, "a", &[], &[]).id, 0);
    }

    #[test]
    fn saved_vocabularies_load_with_same_checksum_and_detect_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let vocabs = Vocabularies {
            title: vocab(&["a", "b"], 1, 4),
            aspects: vocab(&["brand:x"], 1, 1),
            categories: vocab(&["shoes"], 1, 1),
            user_features: vocab(&["age:1"], 1, 1),
            item_ids: vocab(&["7", "7", "3"], 1, 1),
        };
        let sum = vocabs.save(dir.path()).unwrap();
        let (back, sum2) = Vocabularies::load(dir.path()).unwrap();
        assert_eq!(back, vocabs);
        assert_eq!(sum, sum2);
        assert_eq!(back.item_ids.known_id("7"), 1, "most frequent first");
        assert_eq!(
            back.item_ids.known_id("4"),
            0,
            "an unknown item has no id row"
        );
        std::fs::write(dir.path().join("title.json"), b"{}").unwrap();
        let err = Vocabularies::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("title.json") && err.contains("checksum"),
            "{err}"
        );
    }
}
