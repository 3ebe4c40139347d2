//! The prepared dataset as the trainer needs it: the catalog tokenized once, and examples
//! encoded compactly (item rows instead of ids, interned queries) so an epoch only has to pad.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::inputs::RawEvent;
use crate::{EventInput, TowerConfig, UserInput, VocabSizes};
use features::layout::{DataLayout, DatasetInfo};
use features::splits::Split;
use features::{Event, Example, Item, ItemTokens, TableReader, Vocabularies};

/// Marks "no item" / "no query" in the compact encodings below.
pub const NONE: u32 = u32::MAX;

/// A prepared dataset: its description, vocabularies and tokenized catalog.
pub struct Dataset {
    pub dir: PathBuf,
    pub info: DatasetInfo,
    pub vocabs: Vocabularies,
    pub catalog: std::sync::Arc<Catalog>,
}

impl Dataset {
    /// Opens `DATA_DIR`, verifying that the vocabularies are the ones `dataset.json` names.
    pub fn open(dir: &Path) -> Result<Dataset> {
        let layout = DataLayout(dir.to_path_buf());
        if !layout.info().is_file() {
            return Err(Error::Mismatch(format!(
                "{}: not a prepared dataset (no dataset.json); run `twotower prepare` first",
                dir.display()
            )));
        }
        let info = DatasetInfo::load(dir)?;
        let (vocabs, checksum) = Vocabularies::load(&layout.vocab())?;
        if checksum != info.vocab_checksum {
            return Err(Error::Mismatch(format!(
                "{}: vocabulary checksum {checksum} differs from dataset.json's {}",
                layout.vocab().display(),
                info.vocab_checksum
            )));
        }
        let catalog = Catalog::load(&layout.items(), &vocabs)?;
        Ok(Dataset {
            dir: dir.to_path_buf(),
            info,
            vocabs,
            catalog: std::sync::Arc::new(catalog),
        })
    }

    pub fn layout(&self) -> DataLayout {
        DataLayout(self.dir.clone())
    }

    /// Catalog rows that training may see: all but the held-out cold items.
    pub fn warm_rows(&self) -> Vec<u32> {
        let split = &self.info.settings.split;
        (0..self.catalog.len() as u32)
            .filter(|&r| !split.is_cold(self.catalog.ids[r as usize]))
            .collect()
    }

    /// Embedding table sizes for this dataset's vocabularies.
    pub fn vocab_sizes(&self) -> VocabSizes {
        VocabSizes {
            title: self.vocabs.title.size(),
            aspects: self.vocabs.aspects.size(),
            categories: self.vocabs.categories.size(),
            user_features: self.vocabs.user_features.size(),
            item_ids: self.vocabs.item_ids.size(),
            title_buckets: i64::from(self.vocabs.title.hash_buckets),
        }
    }

    /// Loads and encodes one split's examples, histories cut to the tower's `history_len`.
    pub fn examples(&self, split: Split, cfg: &TowerConfig) -> Result<ExampleSet> {
        self.examples_with_history(split, cfg.history_len)
    }

    /// Loads and encodes one split's examples, keeping the last `history_len` events of each
    /// stored history (`usize::MAX`: all that `prepare` stored).
    pub fn examples_with_history(&self, split: Split, history_len: usize) -> Result<ExampleSet> {
        ExampleSet::load(
            &self.layout().split(split),
            &self.catalog.row_of,
            &self.vocabs,
            history_len,
        )
    }
}

/// Every item, tokenized, with a dense row number per item id.
pub struct Catalog {
    pub ids: Vec<u64>,
    pub tokens: Vec<ItemTokens>,
    pub row_of: HashMap<u64, u32>,
}

impl Catalog {
    pub fn load(items_path: &Path, vocabs: &Vocabularies) -> Result<Catalog> {
        let mut catalog = Catalog {
            ids: Vec::new(),
            tokens: Vec::new(),
            row_of: HashMap::new(),
        };
        for batch in TableReader::<Item>::open(items_path)? {
            for item in batch? {
                catalog.push(&item, vocabs);
            }
        }
        Ok(catalog)
    }

    /// Adds one item (tokenizing it with `vocabs`).
    pub fn push(&mut self, item: &Item, vocabs: &Vocabularies) {
        self.row_of.insert(item.item_id, self.ids.len() as u32);
        self.ids.push(item.item_id);
        self.tokens.push(vocabs.item_tokens(
            item.item_id,
            &item.title,
            &item.aspects,
            &item.categories,
        ));
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// One history event, compactly.
#[derive(Debug, Clone, Copy)]
pub struct EncodedEvent {
    pub event_type: u8,
    pub item_row: u32,
    pub query: u32,
    pub gap_s: i64,
}

/// One example with catalog rows instead of item ids.
#[derive(Debug, Clone)]
pub struct EncodedExample {
    pub user_id: u64,
    pub ts_ms: i64,
    pub target_row: u32,
    pub history: Vec<EncodedEvent>,
    pub hour: u8,
    pub weekday: u8,
    pub user_features: Vec<i64>,
}

/// A split's examples and the query token lists they refer to.
pub struct ExampleSet {
    pub examples: Vec<EncodedExample>,
    pub queries: Vec<Vec<i64>>,
}

impl ExampleSet {
    /// Reads and encodes a split file; `row_of` maps item ids to rows of the item vectors the
    /// user tower will read (the catalog, or an index's embeddings). Targets must be catalog
    /// items; history items that are not (e.g. removed from the catalog) become type-only events.
    pub fn load(
        path: &Path,
        row_of: &HashMap<u64, u32>,
        vocabs: &Vocabularies,
        history_len: usize,
    ) -> Result<ExampleSet> {
        let mut set = ExampleSet {
            examples: Vec::new(),
            queries: Vec::new(),
        };
        let mut row = 0usize;
        for batch in TableReader::<Example>::open(path)? {
            for ex in batch? {
                row += 1;
                let Some(&target_row) = row_of.get(&ex.target_item_id) else {
                    return Err(Error::Mismatch(format!(
                        "{}: row {row}: target item {} is not in items.parquet",
                        path.display(),
                        ex.target_item_id
                    )));
                };
                let start = ex.history.len().saturating_sub(history_len);
                let input = UserInput::encode(
                    ex.history[start..].iter().map(|h| RawEvent {
                        event_type: h.event_type,
                        item_id: h.item_id,
                        query: h.query.as_deref(),
                        gap_s: h.gap_s,
                    }),
                    (ex.hour, ex.weekday),
                    &ex.user_features,
                    vocabs,
                    |id| row_of.get(&id).map(|&r| r as i64),
                );
                // Stored compactly: rows as u32, each query's word ids once in `queries`.
                let history = input
                    .history
                    .into_iter()
                    .map(|e| EncodedEvent {
                        event_type: e.event_type as u8,
                        item_row: e.item_row.map_or(NONE, |r| r as u32),
                        query: if e.query.is_empty() {
                            NONE
                        } else {
                            set.queries.push(e.query);
                            (set.queries.len() - 1) as u32
                        },
                        gap_s: e.gap_s,
                    })
                    .collect();
                set.examples.push(EncodedExample {
                    user_id: ex.user_id,
                    ts_ms: ex.ts_ms,
                    target_row,
                    history,
                    hour: input.hour,
                    weekday: input.weekday,
                    user_features: input.user_features,
                });
            }
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The user-tower input of one example; `item_row` maps catalog rows to rows of the item
    /// vectors the tower will receive.
    pub fn user_input(
        &self,
        ex: &EncodedExample,
        mut item_row: impl FnMut(u32) -> i64,
    ) -> UserInput {
        UserInput {
            history: ex
                .history
                .iter()
                .map(|h| EventInput {
                    event_type: h.event_type as i64,
                    item_row: (h.item_row != NONE).then(|| item_row(h.item_row)),
                    query: if h.query == NONE {
                        Vec::new()
                    } else {
                        self.queries[h.query as usize].clone()
                    },
                    gap_s: h.gap_s,
                })
                .collect(),
            hour: ex.hour,
            weekday: ex.weekday,
            user_features: ex.user_features.clone(),
        }
    }
}

/// Each user's item interactions in canonical order: what full-ranking evaluation masks.
pub struct SeenItems {
    /// Per user, `(item id, catalog row)` in the order of `events.parquet`.
    by_user: HashMap<u64, Vec<(u64, u32)>>,
}

impl SeenItems {
    /// `prepare` writes each user's events in canonical order (time, then the dataset's tie
    /// order), so file order is the order "before" refers to, whichever tie order was chosen.
    pub fn load(events_path: &Path, catalog: &Catalog) -> Result<SeenItems> {
        let mut by_user: HashMap<u64, Vec<(u64, u32)>> = HashMap::new();
        for batch in TableReader::<Event>::open(events_path)? {
            for e in batch? {
                if let Some((id, &row)) = e
                    .item_id
                    .and_then(|id| Some((id, catalog.row_of.get(&id)?)))
                {
                    by_user.entry(e.user_id).or_default().push((id, row));
                }
            }
        }
        Ok(SeenItems { by_user })
    }

    /// Catalog rows of the items the user interacted with before the target in canonical order.
    /// A target is the user's first interaction with its item, so "before" is everything ahead
    /// of that item's first event.
    pub fn before(&self, user_id: u64, target_item: u64) -> impl Iterator<Item = u32> + '_ {
        let events = self.by_user.get(&user_id).map(Vec::as_slice).unwrap_or(&[]);
        // A target missing from events.parquet means the splits and the events disagree (not
        // our output); mask nothing rather than the user's future.
        let end = events
            .iter()
            .position(|&(item, _)| item == target_item)
            .unwrap_or(0);
        events[..end].iter().map(|&(_, row)| row)
    }
}

/// `(user id, item id, catalog row)` in canonical order, as [`SeenItems::load`] reads them.
impl FromIterator<(u64, u64, u32)> for SeenItems {
    fn from_iter<I: IntoIterator<Item = (u64, u64, u32)>>(events: I) -> SeenItems {
        let mut by_user: HashMap<u64, Vec<(u64, u32)>> = HashMap::new();
        for (user, item, row) in events {
            by_user.entry(user).or_default().push((item, row));
        }
        SeenItems { by_user }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use features::EventType;

    #[test]
    fn seen_items_are_what_precedes_the_target_in_file_order() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.parquet");
        let ev = |user_id, ts_ms, item| Event {
            user_id,
            ts_ms,
            event_type: EventType::View,
            item_id: Some(item),
            query: None,
            value: None,
        };
        // Source-order ties: 30 before 20 within second 5; 10 again after both.
        let events = [
            ev(1, 1, 10),
            ev(1, 5, 30),
            ev(1, 5, 20),
            ev(2, 1, 20),
            ev(1, 9, 10),
        ];
        features::write_table(&path, &events).unwrap();
        let catalog = Catalog {
            ids: vec![10, 20, 30],
            tokens: Vec::new(),
            row_of: HashMap::from([(10, 0), (20, 1), (30, 2)]),
        };
        let seen = SeenItems::load(&path, &catalog).unwrap();
        let rows = |user, target| seen.before(user, target).collect::<Vec<_>>();
        assert_eq!(rows(1, 20), [0, 2], "10 and the tie 30 came first");
        assert_eq!(rows(1, 30), [0]);
        assert_eq!(rows(1, 10), Vec::<u32>::new());
        assert_eq!(rows(2, 20), Vec::<u32>::new());
        assert_eq!(rows(3, 20), Vec::<u32>::new(), "unknown user");
        assert_eq!(
            rows(2, 30),
            Vec::<u32>::new(),
            "target not among the user's events"
        );
    }
}
