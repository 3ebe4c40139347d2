//! A deterministic synthetic e-commerce dataset shaped like eBay's.
//!
//! The catalog is a category tree (top level → sub-category → leaf) whose leaves own their
//! distinctive title words and whose top levels own their brands; item popularity is Zipf within
//! each leaf, and a fraction of items are *new*: listed after [`SyntheticGenerator::split_cutoff_ms`]
//! and only acted on after that, for cold-start evaluation. Users have latent favourite leaves
//! and brands and act in sessions (search, views, watches, add-to-carts, purchases), so their
//! next item is predictable from the content of their history.
//!
//! Everything streams: items are rebuilt from their index and users one at a time, each from
//! its own `ChaCha8Rng` seeded from `seed` and the index. Memory is O(categories + words),
//! whatever the numbers of items and events, and the same config always gives the same data.

mod catalog;
mod sample;
mod users;

use serde::{Deserialize, Serialize};

use features::error::{Error, Result};
use features::records::{Event, Item, User};

/// Sizes and tunables of a synthetic dataset. Missing fields take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyntheticConfig {
    pub items: u64,
    pub users: u64,
    /// Total events, within rounding (each user gets at least 5, or `events / users` if fewer).
    pub events: u64,
    pub seed: u64,
    /// Top-level categories (the first 12 have real names, further ones made-up names).
    pub categories: usize,
    /// Sub-categories per top-level category.
    pub subcategories: usize,
    /// Leaf categories per sub-category.
    pub leaves: usize,
    /// Brands per top-level category.
    pub brands: usize,
    /// Distinctive title words per leaf category.
    pub words_per_leaf: usize,
    /// Share of items listed after the split cutoff.
    pub new_item_fraction: f64,
    /// Start of the data, ms since the epoch (default 2024-01-01 UTC).
    pub start_ms: i64,
    /// Length of the data in days.
    pub days: u32,
    /// Where in the period the split cutoff falls (0..1).
    pub cutoff_fraction: f64,
    /// Share of sessions spent in the user's favourite categories.
    pub taste_strength: f64,
    /// Zipf exponent of item popularity within a leaf category.
    pub popularity_exponent: f64,
    /// Skew of user activity: 0 gives everyone the same number of events.
    pub activity_skew: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            items: 5_000,
            users: 1_000,
            events: 60_000,
            seed: 42,
            categories: 12,
            subcategories: 4,
            leaves: 5,
            brands: 20,
            words_per_leaf: 12,
            new_item_fraction: 0.05,
            start_ms: 1_704_067_200_000,
            days: 366,
            cutoff_fraction: 0.9,
            taste_strength: 0.75,
            popularity_exponent: 1.0,
            activity_skew: 0.5,
        }
    }
}

impl SyntheticConfig {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        fn check(ok: bool, setting: &str, reason: &str) -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(Error::setting(setting, reason))
            }
        }
        check(
            (1..=1 << 40).contains(&self.items),
            "items",
            "must be between 1 and 2^40",
        )?;
        check(self.users >= 1, "users", "must be at least 1")?;
        check(
            self.events >= self.users,
            "events",
            &format!("must be at least `users` ({})", self.users),
        )?;
        check(
            (1..=64).contains(&self.categories),
            "categories",
            "must be between 1 and 64",
        )?;
        check(
            (1..=32).contains(&self.subcategories),
            "subcategories",
            "must be between 1 and 32",
        )?;
        check(
            (1..=64).contains(&self.leaves),
            "leaves",
            "must be between 1 and 64",
        )?;
        let leaves = self.categories * self.subcategories * self.leaves;
        check(
            leaves <= 20_000,
            "leaves",
            &format!("categories × subcategories × leaves is {leaves}, more than 20000"),
        )?;
        check(
            (1..=500).contains(&self.brands),
            "brands",
            "must be between 1 and 500",
        )?;
        check(
            (1..=64).contains(&self.words_per_leaf),
            "words_per_leaf",
            "must be between 1 and 64",
        )?;
        check(
            (0.0..=0.5).contains(&self.new_item_fraction),
            "new_item_fraction",
            "must be between 0 and 0.5",
        )?;
        check(
            (1..=3660).contains(&self.days),
            "days",
            "must be between 1 and 3660",
        )?;
        check(
            self.cutoff_fraction > 0.0 && self.cutoff_fraction < 1.0,
            "cutoff_fraction",
            "must be strictly between 0 and 1",
        )?;
        check(
            (0.0..=1.0).contains(&self.taste_strength),
            "taste_strength",
            "must be between 0 and 1",
        )?;
        check(
            (0.0..=3.0).contains(&self.popularity_exponent),
            "popularity_exponent",
            "must be between 0 and 3",
        )?;
        check(
            (0.0..=0.9).contains(&self.activity_skew),
            "activity_skew",
            "must be between 0 and 0.9",
        )
    }
}

/// Generates items and users with their events from a [`SyntheticConfig`].
pub struct SyntheticGenerator {
    cfg: SyntheticConfig,
    catalog: catalog::Catalog,
    population: users::Population,
}

impl SyntheticGenerator {
    /// Validates the config and builds the catalog structure (categories, words, brands).
    pub fn new(cfg: SyntheticConfig) -> Result<Self> {
        cfg.validate()?;
        let catalog = catalog::Catalog::new(&cfg);
        let population = users::Population::new(&cfg, &catalog);
        Ok(SyntheticGenerator {
            cfg,
            catalog,
            population,
        })
    }

    pub fn config(&self) -> &SyntheticConfig {
        &self.cfg
    }

    /// Item number `index` (`0..items`), whose `item_id` is `index + 1`. O(log categories).
    ///
    /// # Panics
    /// If `index >= items`.
    pub fn item(&self, index: u64) -> Item {
        assert!(
            index < self.cfg.items,
            "item index {index} out of range 0..{}",
            self.cfg.items
        );
        self.catalog.item(index)
    }

    /// All items, in id order.
    pub fn items(&self) -> impl Iterator<Item = Item> + '_ {
        (0..self.cfg.items).map(|i| self.catalog.item(i))
    }

    /// User number `index` (`0..users`, `user_id = index + 1`) and their events, sorted by
    /// (time, item id) with searches first.
    ///
    /// # Panics
    /// If `index >= users`.
    pub fn user(&self, index: u64) -> (User, Vec<Event>) {
        assert!(
            index < self.cfg.users,
            "user index {index} out of range 0..{}",
            self.cfg.users
        );
        self.population.user(&self.catalog, index)
    }

    /// All users with their events, one user at a time, in id order.
    pub fn users(&self) -> impl Iterator<Item = (User, Vec<Event>)> + '_ {
        (0..self.cfg.users).map(|u| self.population.user(&self.catalog, u))
    }

    /// New items are listed after this time and have no events before it.
    pub fn split_cutoff_ms(&self) -> i64 {
        self.catalog.cutoff_ms
    }

    /// The period sessions start in, `[start, end)` in ms since the epoch.
    pub fn time_range_ms(&self) -> (i64, i64) {
        (self.catalog.start_ms, self.catalog.end_ms)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use features::records::EventType;

    fn small() -> SyntheticConfig {
        SyntheticConfig {
            items: 2_000,
            users: 200,
            events: 10_000,
            ..SyntheticConfig::default()
        }
    }

    fn all_events(g: &SyntheticGenerator) -> Vec<Event> {
        g.users().flat_map(|(_, e)| e).collect()
    }

    #[test]
    fn synthetic_same_config_same_data_and_seed_matters() {
        let a = SyntheticGenerator::new(small()).unwrap();
        let b = SyntheticGenerator::new(small()).unwrap();
        assert!(a.items().eq(b.items()));
        assert!(a.users().eq(b.users()));
        let c = SyntheticGenerator::new(SyntheticConfig { seed: 7, ..small() }).unwrap();
        assert!(!a.items().eq(c.items()));
        assert!(!a.users().eq(c.users()));
    }

    #[test]
    fn synthetic_item_is_random_access_and_well_formed() {
        let g = SyntheticGenerator::new(small()).unwrap();
        for (i, item) in g.items().enumerate() {
            assert_eq!(item, g.item(i as u64));
            assert_eq!(item.item_id, i as u64 + 1);
            assert_eq!(item.categories.len(), 3);
            assert!(item
                .categories
                .iter()
                .all(|c| !c.is_empty() && *c == c.to_lowercase()));
            assert!(
                item.aspects[0].starts_with("brand:")
                    && item.aspects.last().unwrap().starts_with("condition:")
            );
            let brand = &item.aspects[0]["brand:".len()..];
            assert!(item.title.to_lowercase().starts_with(brand), "{item:?}");
            assert!(
                features::tokenizer::words(&item.title).count() >= 3,
                "{item:?}"
            );
        }
    }

    #[test]
    fn synthetic_events_are_valid_sorted_and_sum_to_config() {
        let cfg = SyntheticConfig::default();
        let g = SyntheticGenerator::new(cfg.clone()).unwrap();
        let (start, end) = g.time_range_ms();
        let mut total = 0u64;
        let mut by_type = BTreeMap::new();
        for (user, events) in g.users() {
            assert!(
                events.len() >= 5,
                "user {} has {} events",
                user.user_id,
                events.len()
            );
            assert_eq!(user.features.len(), 3);
            for e in &events {
                assert_eq!(e.user_id, user.user_id);
                assert!(e.ts_ms >= start && e.ts_ms < end + 86_400_000);
                *by_type.entry(e.event_type).or_insert(0u64) += 1;
                match e.event_type {
                    EventType::Search => assert!(
                        e.item_id.is_none() && !e.query.as_deref().unwrap().trim().is_empty()
                    ),
                    _ => {
                        assert!(e.query.is_none() && (1..=cfg.items).contains(&e.item_id.unwrap()))
                    }
                }
                assert_eq!(e.value.is_some(), e.event_type == EventType::Purchase);
            }
            let key = |e: &Event| (e.ts_ms, e.item_id.unwrap_or(0));
            assert!(events.windows(2).all(|w| key(&w[0]) <= key(&w[1])));
            total += events.len() as u64;
        }
        let off = (total as f64 / cfg.events as f64 - 1.0).abs();
        assert!(off < 0.05, "{total} events for {} configured", cfg.events);
        eprintln!("{total} events: {by_type:?}");
        let share = |t| by_type.get(&t).copied().unwrap_or(0) as f64 / total as f64;
        assert!((0.6..0.8).contains(&share(EventType::View)), "{by_type:?}");
        assert!(
            (0.05..0.12).contains(&share(EventType::Search)),
            "{by_type:?}"
        );
        assert!(
            share(EventType::Purchase) > 0.02
                && share(EventType::Purchase) < share(EventType::AddToCart),
            "{by_type:?}"
        );
    }

    #[test]
    fn synthetic_new_items_appear_after_cutoff_and_get_events_only_then() {
        let g = SyntheticGenerator::new(SyntheticConfig::default()).unwrap();
        let cutoff = g.split_cutoff_ms();
        let created: Vec<i64> = g.items().map(|i| i.created_at_ms.unwrap()).collect();
        let new = created.iter().filter(|&&c| c > cutoff).count() as f64 / created.len() as f64;
        assert!((0.03..0.07).contains(&new), "new item share {new}");
        let mut on_new = 0;
        for e in all_events(&g).iter().filter(|e| e.item_id.is_some()) {
            let c = created[e.item_id.unwrap() as usize - 1];
            assert!(e.ts_ms >= c, "event before its item was listed: {e:?}");
            on_new += (c > cutoff) as usize;
        }
        eprintln!("new items: {:.1}%, {on_new} events on them", 100.0 * new);
        assert!(on_new > 100, "only {on_new} events on new items");
    }

    #[test]
    fn synthetic_users_favourite_category_persists() {
        let g = SyntheticGenerator::new(SyntheticConfig::default()).unwrap();
        let leaf = |id: u64| g.item(id - 1).categories[2].clone();
        let mode = |leaves: &[String]| {
            let mut counts = BTreeMap::new();
            for l in leaves {
                *counts.entry(l).or_insert(0) += 1;
            }
            counts
                .into_iter()
                .max_by_key(|(_, c)| *c)
                .map(|(l, _)| l.clone())
        };
        let (mut same, mut users) = (0, 0);
        for (_, events) in g.users() {
            let leaves: Vec<String> = events.iter().filter_map(|e| e.item_id).map(leaf).collect();
            if leaves.len() >= 20 {
                let (first, second) = leaves.split_at(leaves.len() / 2);
                same += (mode(first) == mode(second)) as usize;
                users += 1;
            }
        }
        eprintln!("favourite leaf persists for {same} of {users} users");
        assert!(
            users > 300 && same as f64 > 0.5 * users as f64,
            "{same} of {users}"
        );
    }

    /// The signal a two-tower model needs: ranking items by the leaf categories of a user's
    /// history (times popularity) finds their next item far more often than popularity alone.
    #[test]
    fn synthetic_history_content_beats_popularity() {
        let cfg = SyntheticConfig::default();
        let g = SyntheticGenerator::new(cfg.clone()).unwrap();
        let leaf: Vec<String> = g.items().map(|i| i.categories[2].clone()).collect();
        let users: Vec<Vec<u64>> = g
            .users()
            .map(|(_, e)| {
                e.iter()
                    .filter_map(|e| e.item_id)
                    .map(|id| id - 1)
                    .collect()
            })
            .collect();
        let mut counts = vec![1.0f64; cfg.items as usize];
        for items in &users {
            for &i in &items[..items.len().saturating_sub(1)] {
                counts[i as usize] += 1.0;
            }
        }
        let top_k = |score: &dyn Fn(usize) -> f64| {
            let mut order: Vec<usize> = (0..counts.len()).collect();
            order.select_nth_unstable_by(49, |&a, &b| score(b).total_cmp(&score(a)));
            order.truncate(50);
            order
        };
        let popular = top_k(&|i| counts[i]);
        let (mut hits_pop, mut hits_content, mut n) = (0, 0, 0);
        for items in users.iter().filter(|items| items.len() >= 10) {
            let (history, target) = (&items[..items.len() - 1], items[items.len() - 1] as usize);
            let mut leaves = BTreeMap::new();
            for &i in history {
                *leaves.entry(leaf[i as usize].as_str()).or_insert(0.0) += 1.0;
            }
            let content = top_k(&|i| {
                (leaves.get(leaf[i].as_str()).copied().unwrap_or(0.0) + 0.05) * counts[i]
            });
            hits_pop += popular.contains(&target) as usize;
            hits_content += content.contains(&target) as usize;
            n += 1;
        }
        eprintln!("recall@50 over {n} users: popularity {hits_pop}, history leaves {hits_content}");
        assert!(
            hits_content >= 2 * hits_pop,
            "popularity {hits_pop}, history leaves {hits_content}"
        );
    }

    #[test]
    fn synthetic_popularity_is_skewed() {
        let cfg = SyntheticConfig::default();
        let g = SyntheticGenerator::new(cfg.clone()).unwrap();
        let mut counts = vec![0u64; cfg.items as usize];
        for id in all_events(&g).iter().filter_map(|e| e.item_id) {
            counts[id as usize - 1] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let total: u64 = counts.iter().sum();
        let top: u64 = counts[..cfg.items as usize / 100].iter().sum();
        eprintln!(
            "top 1% of items have {:.1}% of item events",
            100.0 * top as f64 / total as f64
        );
        assert!(
            top as f64 >= 0.1 * total as f64,
            "top 1% of items have {top} of {total} events"
        );
    }

    #[test]
    fn synthetic_scales_to_ten_million_items_without_per_item_state() {
        let cfg = SyntheticConfig {
            items: 10_000_000,
            users: 10,
            events: 500,
            ..SyntheticConfig::default()
        };
        let g = SyntheticGenerator::new(cfg).unwrap();
        let last = g.item(9_999_999);
        assert_eq!(last.item_id, 10_000_000);
        let events: Vec<Event> = all_events(&g);
        assert!(events
            .iter()
            .filter_map(|e| e.item_id)
            .all(|id| id <= 10_000_000));
    }

    #[test]
    fn synthetic_tiny_and_invalid_configs() {
        let tiny = SyntheticConfig {
            items: 1,
            users: 1,
            events: 1,
            ..SyntheticConfig::default()
        };
        let g = SyntheticGenerator::new(tiny).unwrap();
        assert_eq!(g.item(0).item_id, 1);
        assert_eq!(g.user(0).1.len(), 1);
        for (cfg, setting) in [
            (
                SyntheticConfig {
                    items: 0,
                    ..SyntheticConfig::default()
                },
                "items",
            ),
            (
                SyntheticConfig {
                    events: 10,
                    ..SyntheticConfig::default()
                },
                "events",
            ),
            (
                SyntheticConfig {
                    new_item_fraction: f64::NAN,
                    ..SyntheticConfig::default()
                },
                "new_item_fraction",
            ),
        ] {
            let err = SyntheticGenerator::new(cfg).err().unwrap().to_string();
            assert!(err.contains(setting), "{err}");
        }
        let partial: SyntheticConfig = serde_json::from_str(r#"{"items": 10, "seed": 3}"#).unwrap();
        assert_eq!(
            partial,
            SyntheticConfig {
                items: 10,
                seed: 3,
                ..SyntheticConfig::default()
            }
        );
    }

    /// Speed check: `cargo test --release -p features synthetic_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn synthetic_speed() {
        let cfg = SyntheticConfig {
            items: 1_000_000,
            users: 500_000,
            events: 20_000_000,
            ..SyntheticConfig::default()
        };
        let g = SyntheticGenerator::new(cfg).unwrap();
        let t = std::time::Instant::now();
        let chars: usize = g.items().map(|i| i.title.len()).sum();
        eprintln!("1M items in {:?} ({chars} title bytes)", t.elapsed());
        let t = std::time::Instant::now();
        let events: usize = g.users().map(|(_, e)| e.len()).sum();
        eprintln!("{events} events in {:?}", t.elapsed());
    }
}
