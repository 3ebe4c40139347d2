//! The catalog: a category tree with per-category words and brands, and items rebuilt on demand
//! from their index.
//!
//! Items are laid out leaf by leaf: leaf `l` owns the indices `start..start + len`; its first
//! `old` items were listed before the data starts, the rest are *new items* listed after the
//! split cutoff. Within a leaf a [`Shuffle`] maps an item's offset to its popularity rank, and
//! popularity is Zipf over ranks. The whole catalog is thus O(leaves) numbers and word lists:
//! any item is rebuilt in O(log leaves), and popular items are drawn without per-item tables,
//! which is what lets the generator serve 10M items in bounded memory.

use std::fmt::Write;
use std::ops::Range;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::sample::{capitalize, mix, unit, zipf_rank, Shuffle, Weighted, WordMaker};
use super::SyntheticConfig;
use features::records::Item;

/// Real names for the first top-level categories and their sub-categories; further ones get
/// made-up names.
const TOPS: [(&str, [&str; 4]); 12] = [
    ("electronics", ["phones", "computers", "audio", "cameras"]),
    ("fashion", ["womens", "mens", "shoes", "bags"]),
    ("home", ["kitchen", "furniture", "decor", "bedding"]),
    ("garden", ["lawn", "plants", "patio", "grills"]),
    ("toys", ["puzzles", "dolls", "models", "boardgames"]),
    ("sports", ["fitness", "cycling", "camping", "golf"]),
    ("motors", ["carparts", "motorcycle", "tires", "carcare"]),
    ("collectibles", ["coins", "stamps", "cards", "comics"]),
    ("health", ["skincare", "vitamins", "fragrance", "haircare"]),
    ("music", ["guitars", "vinyl", "drums", "keyboards"]),
    ("books", ["fiction", "textbooks", "childrens", "cookbooks"]),
    ("jewelry", ["watches", "rings", "necklaces", "earrings"]),
];

/// Words any listing may use: they carry no category signal, like eBay's "new", "lot", "vintage".
const GENERIC: [&str; 40] = [
    "tested",
    "boxed",
    "vintage",
    "lot",
    "set",
    "pro",
    "mini",
    "large",
    "small",
    "classic",
    "rare",
    "bundle",
    "authentic",
    "sealed",
    "original",
    "genuine",
    "premium",
    "deluxe",
    "edition",
    "limited",
    "portable",
    "free",
    "shipping",
    "fast",
    "best",
    "quality",
    "great",
    "condition",
    "brand",
    "oem",
    "kit",
    "pack",
    "pair",
    "collection",
    "unique",
    "modern",
    "retro",
    "heavy",
    "light",
    "size",
];

pub(super) const COLORS: [&str; 12] = [
    "black", "white", "silver", "blue", "red", "gray", "green", "gold", "pink", "brown", "purple",
    "orange",
];

/// Made-up words per sub-category (shared by its leaves).
const SUB_WORDS: usize = 6;
/// Zipf exponent of leaf popularity: a few categories get most of the traffic.
const LEAF_ZIPF: f64 = 0.7;

const CATALOG_SALT: u64 = 0xCA7A_1060;
const SHUFFLE_SALT: u64 = 0x5AFF_1E00;
const ITEM_SALT: u64 = 0x17E4_0000;
const BRAND_SALT: u64 = 0xB4A4_D000;
const CREATED_SALT: u64 = 0xC4EA_7ED0;
const YEAR_MS: f64 = 365.0 * 86_400_000.0;

pub(super) struct Top {
    pub name: String,
    /// Lowercase brand names, most common first.
    pub brands: Vec<String>,
    brand_titles: Vec<String>,
    pub leaves: Range<usize>,
}

struct Sub {
    name: String,
    words: Vec<String>,
}

pub(super) struct Leaf {
    pub top: usize,
    sub: usize,
    name: String,
    /// Distinctive title and query words, most common first.
    words: Vec<String>,
    start: u64,
    len: u64,
    /// Items `start..start + old` are old; the rest are new.
    old: u64,
    /// Offset within the leaf → popularity rank.
    ranks: Shuffle,
}

pub(super) struct Catalog {
    pub tops: Vec<Top>,
    subs: Vec<Sub>,
    pub leaves: Vec<Leaf>,
    /// `leaves[l].start`, for finding an index's leaf by binary search.
    starts: Vec<u64>,
    /// Global leaf popularity (zero for empty leaves).
    pub leaf_pop: Weighted,
    seed: u64,
    zipf: f64,
    pub start_ms: i64,
    pub cutoff_ms: i64,
    pub end_ms: i64,
}

impl Catalog {
    pub fn new(cfg: &SyntheticConfig) -> Catalog {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(CATALOG_SALT, cfg.seed));
        let reserved = GENERIC.iter().chain(&COLORS).copied().chain(
            TOPS.iter()
                .flat_map(|(t, s)| std::iter::once(*t).chain(s.iter().copied())),
        );
        let mut maker = WordMaker::new(reserved);
        let (mut tops, mut subs, mut leaves) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..cfg.categories {
            let name = TOPS
                .get(t)
                .map_or_else(|| maker.make(&mut rng), |x| x.0.to_string());
            let brands: Vec<String> = (0..cfg.brands).map(|_| maker.make(&mut rng)).collect();
            let first_leaf = leaves.len();
            for s in 0..cfg.subcategories {
                let name = TOPS
                    .get(t)
                    .and_then(|x| x.1.get(s))
                    .map_or_else(|| maker.make(&mut rng), |n| n.to_string());
                let words = (0..SUB_WORDS).map(|_| maker.make(&mut rng)).collect();
                subs.push(Sub { name, words });
                for _ in 0..cfg.leaves {
                    leaves.push(Leaf {
                        top: t,
                        sub: subs.len() - 1,
                        name: maker.make(&mut rng),
                        words: (0..cfg.words_per_leaf)
                            .map(|_| maker.make(&mut rng))
                            .collect(),
                        start: 0,
                        len: 0,
                        old: 0,
                        ranks: Shuffle::new(1, 0),
                    });
                }
            }
            let brand_titles = brands.iter().map(|b| capitalize(b)).collect();
            tops.push(Top {
                name,
                brands,
                brand_titles,
                leaves: first_leaf..leaves.len(),
            });
        }

        // Leaf popularity is Zipf over a random order of the leaves; leaf sizes grow with
        // popularity but more flatly (popular categories have more listings, not proportionally).
        let mut order: Vec<usize> = (0..leaves.len()).collect();
        order.shuffle(&mut rng);
        let mut pop = vec![0.0; leaves.len()];
        for (rank, &l) in order.iter().enumerate() {
            pop[l] = (rank as f64 + 1.0).powf(-LEAF_ZIPF);
        }
        let size: Vec<f64> = pop
            .iter()
            .map(|p| p.sqrt() * (0.7 + 0.6 * rng.random::<f64>()))
            .collect();
        let total: f64 = size.iter().sum();
        let mut acc = 0.0;
        let mut start = 0u64;
        for (l, leaf) in leaves.iter_mut().enumerate() {
            acc += size[l];
            let end = if l + 1 == size.len() {
                cfg.items
            } else {
                ((acc / total * cfg.items as f64) as u64).clamp(start, cfg.items)
            };
            leaf.start = start;
            leaf.len = end - start;
            let new = ((leaf.len as f64 * cfg.new_item_fraction).round() as u64)
                .min(leaf.len.saturating_sub(1));
            leaf.old = leaf.len - new;
            leaf.ranks = Shuffle::new(leaf.len, mix(SHUFFLE_SALT ^ cfg.seed, l as u64));
            start = end;
        }
        let leaf_pop =
            Weighted::new(
                leaves
                    .iter()
                    .zip(&pop)
                    .map(|(leaf, p)| if leaf.len > 0 { *p } else { 0.0 }),
            );

        let end_ms = cfg.start_ms + cfg.days as i64 * 86_400_000;
        let cutoff_ms =
            cfg.start_ms + ((end_ms - cfg.start_ms) as f64 * cfg.cutoff_fraction) as i64;
        Catalog {
            starts: leaves.iter().map(|l| l.start).collect(),
            tops,
            subs,
            leaves,
            leaf_pop,
            seed: cfg.seed,
            zipf: cfg.popularity_exponent,
            start_ms: cfg.start_ms,
            cutoff_ms,
            end_ms,
        }
    }

    /// The leaf holding item `index` (the last leaf starting at or before it is non-empty).
    fn leaf_of(&self, index: u64) -> usize {
        self.starts.partition_point(|&s| s <= index) - 1
    }

    /// Listing time: old items within the year before the data starts, new items in the first
    /// half of the period after the cutoff (so they still collect events).
    fn created_at(&self, leaf: &Leaf, index: u64) -> i64 {
        let u = unit(mix(CREATED_SALT ^ self.seed, index));
        if index - leaf.start < leaf.old {
            self.start_ms - 1 - (u * YEAR_MS) as i64
        } else {
            self.cutoff_ms + 1 + (u * (self.end_ms - self.cutoff_ms) as f64 * 0.5) as i64
        }
    }

    /// Brand index within the top-level category. Popular items lean to the big brands, so a
    /// content-only model can learn a popularity prior from the brand.
    fn brand(&self, leaf: &Leaf, index: u64, rank: u64) -> u32 {
        let q = rank as f64 / leaf.len as f64;
        let u = 0.6 * q + 0.4 * unit(mix(BRAND_SALT ^ self.seed, index));
        zipf_rank(u, self.tops[leaf.top].brands.len() as u64, 1.0) as u32
    }

    /// Item `index`, rebuilt from its index alone.
    pub fn item(&self, index: u64) -> Item {
        let leaf = &self.leaves[self.leaf_of(index)];
        let (top, sub) = (&self.tops[leaf.top], &self.subs[leaf.sub]);
        let rank = leaf.ranks.apply(index - leaf.start);
        let q = rank as f64 / leaf.len as f64;
        let brand = self.brand(leaf, index, rank) as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(mix(ITEM_SALT ^ self.seed, index));
        let color = rng
            .random_bool(0.85)
            .then(|| COLORS[zipf_rank(rng.random(), COLORS.len() as u64, 0.7) as usize]);
        let p_new = 0.75 - 0.3 * q;
        let c = rng.random::<f64>();
        let condition = if c < p_new {
            "new"
        } else if c < p_new + (1.0 - p_new) * 0.7 {
            "used"
        } else {
            "refurbished"
        };

        let mut title = String::with_capacity(64);
        title.push_str(&top.brand_titles[brand]);
        let mut used = [usize::MAX; 3];
        for j in 0..rng.random_range(2..=3usize) {
            let w = zipf_rank(rng.random(), leaf.words.len() as u64, 0.8) as usize;
            if !used[..j].contains(&w) {
                used[j] = w;
            }
        }
        for &w in used.iter().filter(|&&w| w != usize::MAX) {
            push_word(&mut title, &leaf.words[w]);
        }
        if rng.random_bool(0.8) {
            push_word(
                &mut title,
                &sub.words[zipf_rank(rng.random(), SUB_WORDS as u64, 0.8) as usize],
            );
        }
        for _ in 0..rng.random_range(1..=2) {
            push_word(
                &mut title,
                GENERIC[zipf_rank(rng.random(), GENERIC.len() as u64, 1.0) as usize],
            );
        }
        if let Some(c) = color.filter(|_| rng.random_bool(0.5)) {
            push_word(&mut title, c);
        }
        if rng.random_bool(0.25) {
            let _ = write!(
                title,
                " {}{}",
                (b'a' + rng.random_range(0..26u8)) as char,
                rng.random_range(1..100) * 10
            );
        }

        let mut aspects = Vec::with_capacity(3);
        aspects.push(format!("brand:{}", top.brands[brand]));
        if let Some(c) = color {
            aspects.push(format!("color:{c}"));
        }
        aspects.push(format!("condition:{condition}"));
        Item {
            item_id: index + 1,
            title,
            aspects,
            categories: vec![top.name.clone(), sub.name.clone(), leaf.name.clone()],
            created_at_ms: Some(self.created_at(leaf, index)),
        }
    }

    /// Draws an item of `leaf` that a user could act on at time `t`: Zipf by popularity, listed
    /// no later than `t`, and (when `brands` is non-empty, for most tries) of one of `brands`.
    /// After the cutoff some draws go to new listings, as fresh items get attention.
    pub fn pick_item(&self, leaf: usize, t: i64, brands: &[u32], rng: &mut impl Rng) -> u64 {
        let lf = &self.leaves[leaf];
        if lf.len == 0 {
            return self.pick_item(self.leaf_pop.sample(rng.random()), t, brands, rng);
        }
        let new = lf.len - lf.old;
        if t > self.cutoff_ms && new > 0 && rng.random_bool(0.2) {
            for _ in 0..4 {
                let index = lf.start + lf.old + zipf_rank(rng.random(), new, self.zipf);
                if self.created_at(lf, index) <= t {
                    return index;
                }
            }
        }
        for attempt in 0..32 {
            let rank = zipf_rank(rng.random(), lf.len, self.zipf);
            let index = lf.start + lf.ranks.invert(rank);
            if index - lf.start >= lf.old && self.created_at(lf, index) > t {
                continue;
            }
            if attempt < 24 && !brands.is_empty() && !brands.contains(&self.brand(lf, index, rank))
            {
                continue;
            }
            return index;
        }
        lf.start // offset 0 is always an old item
    }

    /// A search query for `leaf`: one or two of its distinctive words, sometimes a
    /// sub-category word, sometimes the brand the user is after.
    pub fn query(&self, leaf: usize, brand: Option<u32>, rng: &mut impl Rng) -> String {
        let lf = &self.leaves[leaf];
        let mut q = String::with_capacity(32);
        if let Some(b) = brand.filter(|_| rng.random_bool(0.5)) {
            q.push_str(&self.tops[lf.top].brands[b as usize]);
        }
        let first = zipf_rank(rng.random(), lf.words.len() as u64, 0.8) as usize;
        push_word(&mut q, &lf.words[first]);
        if rng.random_bool(0.4) {
            let second = zipf_rank(rng.random(), lf.words.len() as u64, 0.8) as usize;
            if second != first {
                push_word(&mut q, &lf.words[second]);
            }
        }
        if rng.random_bool(0.3) {
            push_word(
                &mut q,
                &self.subs[lf.sub].words[zipf_rank(rng.random(), SUB_WORDS as u64, 0.8) as usize],
            );
        }
        q
    }
}

fn push_word(s: &mut String, w: &str) {
    if !s.is_empty() {
        s.push(' ');
    }
    s.push_str(w);
}
