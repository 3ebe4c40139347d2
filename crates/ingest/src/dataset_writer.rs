//! The writer of a prepared dataset: items, users, events and the three splits streamed into a
//! temporary directory beside `DATA_DIR`, the vocabularies built from the training period only,
//! `dataset.json` last, then the directory swapped into place.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use features::error::{Error, Result};
use features::fsutil::{check_replaceable, StagingDir};
use features::layout::{Counts, DataLayout, DatasetInfo, PrepareConfig, Provenance};
use features::progress::Progress;
use features::records::{Event, EventType, Example, Item, User};
use features::splits::{self, Split, SplitStrategy};
use features::table::{TableWriter, ROW_GROUP_ROWS};
use features::tokenizer::{words, Counter, Vocabularies};

/// Streams tables and examples into a temporary directory, then publishes it.
pub(crate) struct DatasetWriter {
    out: PathBuf,
    cfg: PrepareConfig,
    provenance: Provenance,
    items: TableWriter<Item>,
    users: TableWriter<User>,
    events: TableWriter<Event>,
    splits: [TableWriter<Example>; 3],
    pub(crate) counts: Counts,
    /// Items seen in any training example: the vocabularies are built from their content only.
    warm_items: HashSet<u64>,
    /// Training targets per item: the item-id vocabulary, most frequent first.
    target_items: Counter,
    queries: Counter,
    user_features: Counter,
    min_ts: i64,
    max_ts: i64,
    /// Last, so that the table writers inside it close before a failed run removes it.
    staging: StagingDir,
}

impl DatasetWriter {
    pub(crate) fn create(out: &Path, cfg: PrepareConfig, provenance: Provenance) -> Result<Self> {
        check_replaceable(out, "out", "prepared dataset", &["dataset.json"])?;
        let staging = StagingDir::create(out, "tmp")?;
        let splits_dir = staging.path().join("splits");
        std::fs::create_dir_all(&splits_dir).map_err(|e| Error::io(&splits_dir, e))?;
        let layout = DataLayout(staging.path().to_path_buf());
        let split_writer = |s: Split| TableWriter::<Example>::create(&layout.split(s));
        Ok(DatasetWriter {
            items: TableWriter::create(&layout.items())?,
            users: TableWriter::create(&layout.users())?,
            events: TableWriter::create(&layout.events())?,
            splits: [
                split_writer(Split::Train)?,
                split_writer(Split::Valid)?,
                split_writer(Split::Test)?,
            ],
            staging,
            out: out.to_path_buf(),
            cfg,
            provenance,
            counts: Counts::default(),
            warm_items: HashSet::new(),
            target_items: Counter::default(),
            queries: Counter::default(),
            user_features: Counter::default(),
            min_ts: i64::MAX,
            max_ts: i64::MIN,
        })
    }

    pub(crate) fn add_items(&mut self, items: &[Item]) -> Result<()> {
        for item in items {
            self.counts.items += 1;
            self.counts.cold_items += self.cfg.split.is_cold(item.item_id) as u64;
        }
        for chunk in items.chunks(ROW_GROUP_ROWS) {
            self.items.write(chunk)?;
        }
        Ok(())
    }

    pub(crate) fn add_user(&mut self, user: &User, events: &[Event]) -> Result<()> {
        self.counts.users += 1;
        self.counts.events += events.len() as u64;
        for f in &user.features {
            self.user_features.add(f.to_lowercase());
        }
        self.users.push(user.clone())?;
        for e in events {
            self.events.push(e.clone())?;
        }
        if let (Some(first), Some(last)) = (events.first(), events.last()) {
            self.min_ts = self.min_ts.min(first.ts_ms);
            self.max_ts = self.max_ts.max(last.ts_ms);
        }
        // Queries after the training period must not shape the vocabulary.
        let mut train_end = match self.cfg.split.strategy {
            SplitStrategy::Time { cutoff_ms, .. } => cutoff_ms,
            SplitStrategy::LeaveLastOut => i64::MAX,
        };
        let mut produced: [Vec<Example>; 3] = Default::default();
        splits::user_examples(
            &self.cfg.split,
            user.user_id,
            &user.features,
            events,
            |split, ex| {
                produced[split as usize].push(ex);
            },
        );
        for (split, examples) in Split::ALL.into_iter().zip(produced) {
            for ex in examples {
                if split == Split::Train {
                    self.warm_items.insert(ex.target_item_id);
                    self.target_items.add(ex.target_item_id.to_string());
                    self.warm_items
                        .extend(ex.history.iter().filter_map(|h| h.item_id));
                } else {
                    train_end = train_end.min(ex.ts_ms);
                    self.counts.cold_targets += self.cfg.split.is_cold(ex.target_item_id) as u64;
                }
                self.push_example(split, ex)?;
            }
        }
        for e in events
            .iter()
            .filter(|e| e.event_type == EventType::Search && e.ts_ms < train_end)
        {
            for w in words(e.query.as_deref().unwrap_or("")) {
                self.queries.add(w);
            }
        }
        Ok(())
    }

    fn push_example(&mut self, split: Split, ex: Example) -> Result<()> {
        self.splits[split as usize].push(ex)
    }

    pub(crate) fn finish(
        mut self,
        items: impl Iterator<Item = Item>,
        started: std::time::Instant,
        progress: &dyn Progress,
    ) -> Result<DatasetInfo> {
        if self.counts.events == 0 {
            return Err(Error::bad_file(&self.provenance.events_label, "no events"));
        }
        self.check_examples()?;
        progress.start("building vocabularies", Some(self.counts.items));
        let vocabs = self.build_vocabularies(items);
        progress.finish();
        let vocab_checksum = vocabs.save(&self.staging.path().join("vocab"))?;
        let [train, valid, test] = self.splits;
        self.counts.train = train.finish()?;
        self.counts.valid = valid.finish()?;
        self.counts.test = test.finish()?;
        self.items.finish()?;
        self.users.finish()?;
        self.events.finish()?;
        let info = DatasetInfo {
            schema_version: features::schema::SCHEMA_VERSION.to_string(),
            provenance: self.provenance,
            counts: self.counts,
            min_ts_ms: self.min_ts,
            max_ts_ms: self.max_ts,
            settings: self.cfg,
            vocab_checksum,
            prepare_seconds: started.elapsed().as_secs_f64(),
        };
        let layout = DataLayout(self.staging.path().to_path_buf());
        features::fsutil::write_json(&layout.info(), &info)?;
        self.staging.publish(&self.out)?;
        Ok(info)
    }

    /// Refuses data that gives nothing to train on, and warns about what would quietly make a
    /// poor dataset: no validation or test examples, and times that look like seconds.
    fn check_examples(&self) -> Result<()> {
        let label = &self.provenance.events_label;
        let c = &self.counts;
        let [train, valid, test] = self.splits.each_ref().map(|s| s.rows());
        if train == 0 {
            return Err(Error::bad_file(
                label,
                format!(
                    "no training examples from {} events of {} users: no item event is a \
                     training target (only searches, every target a held-out cold item, or \
                     every event after the time split's cutoff; docs/data.md)",
                    c.events, c.users
                ),
            ));
        }
        if valid == 0 || test == 0 {
            tracing::warn!(
                valid,
                test,
                "no validation or no test examples: training cannot stop early or be evaluated"
            );
        }
        // Unix seconds of any date since 2001 read as milliseconds land in January 1970 to 1973.
        if (1_000_000_000..100_000_000_000).contains(&self.max_ts) {
            tracing::warn!(
                file = %label.display(),
                latest_ms = self.max_ts,
                "every event time is before 1973 as milliseconds since 1970: if they are Unix \
                 seconds, multiply them by 1000 (time gaps, hours and weekdays would be wrong)"
            );
        }
        Ok(())
    }

    fn build_vocabularies(&mut self, items: impl Iterator<Item = Item>) -> Vocabularies {
        let mut title = std::mem::take(&mut self.queries);
        let (mut aspects, mut categories) = (Counter::default(), Counter::default());
        for item in items.filter(|i| self.warm_items.contains(&i.item_id)) {
            for w in words(&item.title) {
                title.add(w);
            }
            for a in &item.aspects {
                aspects.add(a.to_lowercase());
            }
            for c in &item.categories {
                categories.add(c.to_lowercase());
            }
        }
        let v = &self.cfg.vocab;
        Vocabularies {
            title: title.into_vocab("title", v.min_count, v.title_buckets),
            aspects: aspects.into_vocab("aspects", 1, 1),
            categories: categories.into_vocab("categories", 1, 1),
            user_features: std::mem::take(&mut self.user_features).into_vocab(
                "user_features",
                1,
                1,
            ),
            item_ids: std::mem::take(&mut self.target_items).into_vocab("item_ids", 1, 1),
        }
    }
}
