//! What the server returns and filters on for each indexed item: title and categories, row-aligned
//! with the index version's embeddings, plus the popularity order used for fallbacks.

use std::collections::HashMap;
use std::path::Path;

use features::{Item, TableReader};

use crate::error::Result;

/// Item metadata of one index version, by embeddings row.
pub struct ItemCatalog {
    titles: Vec<Box<str>>,
    /// Category ids of each row (into `category_names`).
    categories: Vec<Box<[u32]>>,
    category_names: Vec<String>,
    /// Lower-cased category name → id. Filters match categories case-insensitively, as the
    /// model's vocabulary does.
    category_ids: HashMap<String, u32>,
    /// Every row, most popular first (interaction count, then item id): the fallback order.
    popular: Vec<u32>,
    /// Interaction share of each row in the popularity counts (the fallback's score).
    popularity: Vec<f32>,
}

impl ItemCatalog {
    /// Reads `items.parquet` of a version; `row_of` maps item ids to embeddings rows, `counts`
    /// holds interaction counts per item id.
    pub fn load(
        items_path: &Path,
        row_of: &HashMap<u64, u32>,
        counts: &HashMap<u64, u64>,
    ) -> Result<ItemCatalog> {
        let n = row_of.len();
        let mut c = ItemCatalog {
            titles: vec![Box::from(""); n],
            categories: vec![Box::from([]); n],
            category_names: Vec::new(),
            category_ids: HashMap::new(),
            popular: Vec::new(),
            popularity: vec![0.0; n],
        };
        for batch in TableReader::<Item>::open(items_path)? {
            for item in batch? {
                let Some(&row) = row_of.get(&item.item_id) else {
                    continue;
                };
                let Item {
                    title, categories, ..
                } = item;
                let ids: Vec<u32> = categories.iter().map(|name| c.intern(name)).collect();
                c.titles[row as usize] = title.into_boxed_str();
                c.categories[row as usize] = ids.into_boxed_slice();
            }
        }
        let mut ids = vec![0u64; n];
        for (&id, &row) in row_of {
            ids[row as usize] = id;
        }
        let total: u64 = ids
            .iter()
            .map(|id| counts.get(id).copied().unwrap_or(0))
            .sum();
        let count = |row: u32| counts.get(&ids[row as usize]).copied().unwrap_or(0);
        c.popular = (0..n as u32).collect();
        c.popular
            .sort_unstable_by_key(|&r| (std::cmp::Reverse(count(r)), ids[r as usize]));
        for r in 0..n as u32 {
            c.popularity[r as usize] = count(r) as f32 / total.max(1) as f32;
        }
        Ok(c)
    }

    fn intern(&mut self, name: &str) -> u32 {
        let key = name.to_lowercase();
        if let Some(&id) = self.category_ids.get(&key) {
            return id;
        }
        let id = self.category_names.len() as u32;
        self.category_names.push(name.to_string());
        self.category_ids.insert(key, id);
        id
    }

    /// The id of a category name (case-insensitive), if any item has it.
    pub fn category_id(&self, name: &str) -> Option<u32> {
        self.category_ids.get(&name.to_lowercase()).copied()
    }

    pub fn title(&self, row: u32) -> &str {
        &self.titles[row as usize]
    }

    pub fn category_ids_of(&self, row: u32) -> &[u32] {
        &self.categories[row as usize]
    }

    pub fn category_names_of(&self, row: u32) -> Vec<String> {
        self.categories[row as usize]
            .iter()
            .map(|&c| self.category_names[c as usize].clone())
            .collect()
    }

    /// Rows, most popular first.
    pub fn popular(&self) -> &[u32] {
        &self.popular
    }

    pub fn popularity(&self, row: u32) -> f32 {
        self.popularity[row as usize]
    }
}
