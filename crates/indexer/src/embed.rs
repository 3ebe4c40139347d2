//! Runs the item tower over a catalog file, row group by row group, without gradients.
//!
//! The catalog is streamed, so memory holds one batch of items plus the vectors produced so far
//! (4·dim bytes per item). `--shard i/n` embeds only the row groups `g` with `g % n == i`, so
//! that n machines can each embed a slice of a catalog too large for one job.

use std::path::Path;
use std::str::FromStr;

use features::{Embeddings, Item, Progress, TableReader, TableWriter, Vocabularies};
use tch::{Device, Kind};
use towers::{ItemBatchHost, TwoTower};

use crate::error::{Error, Result};

/// One slice of a sharded embedding job: row groups `g` with `g % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = Error;

    /// Parses `i/n` with `0 ≤ i < n`.
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || {
            Error::invalid(format!(
                "--shard `{s}`: expected i/n with 0 <= i < n, e.g. 0/4"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse::<usize>().map_err(|_| bad())?,
            n.trim().parse::<usize>().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Embeds the items of `items_path` (or of one shard of it). Every item read is also copied to
/// `items_out`, so the index version carries the titles and categories the server returns.
pub fn embed_items(
    items_path: &Path,
    model: &TwoTower,
    vocabs: &Vocabularies,
    batch_size: usize,
    shard: Option<Shard>,
    mut items_out: Option<&mut TableWriter<Item>>,
    progress: &dyn Progress,
) -> Result<Embeddings> {
    if batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    let groups = features::table::row_group_count(items_path)?;
    let selected = shard.map(|s| (0..groups).filter(|g| g % s.count == s.index).collect());
    let reader = TableReader::<Item>::open_row_groups(items_path, selected)?;
    let total = match shard {
        Some(s) => reader.total_rows() / s.count,
        None => reader.total_rows(),
    };
    progress.start("embedding items", Some(total as u64));
    let cfg = &model.config;
    let mut out = Embeddings::new(cfg.dim as usize);
    let mut pending: Vec<Item> = Vec::with_capacity(batch_size);
    for batch in reader {
        for item in batch? {
            pending.push(item);
            if pending.len() == batch_size {
                embed_batch(&pending, model, vocabs, &mut out)?;
                if let Some(w) = &mut items_out {
                    w.write(&pending)?;
                }
                progress.advance(pending.len() as u64);
                pending.clear();
            }
        }
    }
    if !pending.is_empty() {
        embed_batch(&pending, model, vocabs, &mut out)?;
        if let Some(w) = &mut items_out {
            w.write(&pending)?;
        }
        progress.advance(pending.len() as u64);
    }
    progress.finish();
    Ok(out)
}

/// Embeds in-memory items (`index add`).
pub fn embed_batch(
    items: &[Item],
    model: &TwoTower,
    vocabs: &Vocabularies,
    out: &mut Embeddings,
) -> Result<()> {
    let tokens: Vec<_> = items
        .iter()
        .map(|i| vocabs.item_tokens(i.item_id, &i.title, &i.aspects, &i.categories))
        .collect();
    let refs: Vec<_> = tokens.iter().collect();
    let inputs = ItemBatchHost::new(&refs, &model.config).to_device(model.device());
    let vectors = tch::no_grad(|| model.encode_items(&inputs, false))
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .view([-1]);
    let vectors = Vec::<f32>::try_from(&vectors)?;
    for (item, v) in items.iter().zip(vectors.chunks(out.dim)) {
        out.push(item.item_id, v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_and_bad_ones_are_named() {
        assert_eq!(
            "1/4".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 4 }
        );
        for bad in ["4/4", "1", "a/2", "0/0"] {
            let err = bad.parse::<Shard>().unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("--shard"), "{err}");
        }
    }
}
