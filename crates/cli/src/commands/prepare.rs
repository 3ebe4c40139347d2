//! `twotower prepare`: a dataset into `DATA_DIR`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use features::records::parse_time_ms;
use features::splits::{HistoryProtocol, SplitConfig, SplitStrategy, TieOrder};
use features::tokenizer::VocabConfig;
use ingest::prepare::{self, PrepareConfig, Provenance};
use ingest::sources::{BadRows, Source};
use ingest::synthetic::{SyntheticConfig, SyntheticGenerator};

use crate::progress::Bars;
use crate::settings::optional_text;

#[derive(Debug, Clone, Copy, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitKind {
    /// Per user: last interaction tests, second-last validates, the rest trains.
    LeaveLastOut,
    /// Global: before --cutoff trains, then validation, then test from --test-cutoff.
    Time,
}

#[derive(Debug, Clone, Copy, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TieKind {
    /// Searches first, then ascending item id: independent of the source's row order.
    ItemId,
    /// The source's row order (RecBole's protocol; random in the MovieLens files).
    Source,
}

#[derive(Debug, Clone, Copy, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HistoryKind {
    /// Events strictly before the target's timestamp (its own second stays out).
    Strict,
    /// Every event ordered before the target, ties included.
    Positional,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Where to write the prepared dataset (replaced atomically if it exists).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    settings: PrepareSettings,
}

/// What to prepare and how: the flags of `twotower prepare`, or a pipeline's `[prepare]` table.
#[derive(Debug, Clone, Args, serde::Deserialize)]
#[serde(default)]
pub struct PrepareSettings {
    /// ml-100k (default data), ml-latest-small, complete-journey, synthetic, or files (your own).
    #[arg(long, default_value = "ml-100k")]
    pub dataset: String,
    /// files: items file (.parquet or .csv). synthetic: number of items.
    #[arg(long)]
    #[serde(deserialize_with = "optional_text")]
    pub items: Option<String>,
    /// files: events file (.parquet or .csv). synthetic: number of events.
    #[arg(long)]
    #[serde(deserialize_with = "optional_text")]
    pub events: Option<String>,
    /// files: optional users file (.parquet or .csv). synthetic: number of users.
    #[arg(long)]
    #[serde(deserialize_with = "optional_text")]
    pub users: Option<String>,
    /// Seed of the synthetic generator and of the cold-item draw.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// What to do with a bad event row: fail (naming it) or skip (and count it).
    #[arg(long, default_value = "fail")]
    pub on_bad_rows: String,
    #[arg(long, value_enum, default_value = "leave-last-out")]
    pub split: SplitKind,
    /// Time split: first time of the validation period (ms since the epoch, or RFC 3339 / YYYY-MM-DD).
    #[arg(long)]
    #[serde(deserialize_with = "optional_text")]
    pub cutoff: Option<String>,
    /// Time split: first time of the test period (default: halfway from --cutoff to the end).
    #[arg(long)]
    #[serde(deserialize_with = "optional_text")]
    pub test_cutoff: Option<String>,
    /// Order of one user's events within the same timestamp; leave-last-out holds out the last.
    #[arg(long, value_enum, default_value = "item-id")]
    pub ties: TieKind,
    /// Which earlier events form a target's history: `strict`, those strictly before its
    /// timestamp; `positional`, every event ordered before it (RecBole's protocol; pair it with
    /// `--ties source`).
    #[arg(long, value_enum, default_value = "strict")]
    pub history: HistoryKind,
    /// Events kept in each example's history (L).
    #[arg(long, default_value_t = 50)]
    pub history_len: usize,
    /// Fraction of items held out entirely, to measure cold-start retrieval.
    #[arg(long, default_value_t = 0.0)]
    pub cold_items: f64,
    /// Minimum count of a title word to get its own embedding (rarer words are hashed).
    #[arg(long, default_value_t = VocabConfig::default().min_count)]
    pub min_count: u32,
    /// Hash buckets for title and query words outside the vocabulary.
    #[arg(long, default_value_t = VocabConfig::default().title_buckets)]
    pub title_buckets: u32,
}

impl Default for PrepareSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

fn time_arg(flag: &str, value: &Option<String>) -> anyhow::Result<Option<i64>> {
    value
        .as_deref()
        .map(|s| {
            parse_time_ms(s).with_context(|| {
                format!("--{flag} `{s}`: expected ms since the epoch, YYYY-MM-DD or RFC 3339")
            })
        })
        .transpose()
}

fn count_arg(flag: &str, value: &Option<String>, default: u64) -> anyhow::Result<u64> {
    match value {
        None => Ok(default),
        Some(s) => s
            .parse()
            .with_context(|| format!("--{flag} `{s}`: synthetic data takes a count here")),
    }
}

pub fn run(args: PrepareArgs) -> anyhow::Result<()> {
    prepare_dataset(&args.settings, &args.out)
}

/// Prepares the dataset `args` describe into `out`.
pub fn prepare_dataset(args: &PrepareSettings, out: &Path) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&args.cold_items) {
        bail!("--cold-items {}: must be in [0, 1)", args.cold_items);
    }
    if args.history_len == 0 {
        bail!("--history-len must be at least 1");
    }
    let on_bad_rows: BadRows = args.on_bad_rows.parse()?;
    let strategy = match args.split {
        SplitKind::LeaveLastOut => SplitStrategy::LeaveLastOut,
        SplitKind::Time => SplitStrategy::Time {
            cutoff_ms: time_arg("cutoff", &args.cutoff)?.context("--split time needs --cutoff")?,
            test_cutoff_ms: time_arg("test-cutoff", &args.test_cutoff)?,
        },
    };
    let mut cfg = PrepareConfig {
        split: SplitConfig {
            strategy,
            ties: match args.ties {
                TieKind::ItemId => TieOrder::ItemId,
                TieKind::Source => TieOrder::Source,
            },
            history: match args.history {
                HistoryKind::Strict => HistoryProtocol::Strict,
                HistoryKind::Positional => HistoryProtocol::Positional,
            },
            history_len: args.history_len,
            cold_items: args.cold_items,
            seed: args.seed,
        },
        vocab: VocabConfig {
            min_count: args.min_count,
            title_buckets: args.title_buckets.max(1),
        },
    };
    let bars = Bars::new();
    let info = if args.dataset == "synthetic" {
        let defaults = SyntheticConfig::default();
        let syn = SyntheticConfig {
            items: count_arg("items", &args.items, defaults.items)?,
            users: count_arg("users", &args.users, defaults.users)?,
            events: count_arg("events", &args.events, defaults.events)?,
            seed: args.seed,
            ..defaults
        };
        let generator = SyntheticGenerator::new(syn.clone())?;
        if let SplitStrategy::Time {
            cutoff_ms,
            test_cutoff_ms: test @ None,
        } = &mut cfg.split.strategy
        {
            let (_, end) = generator.time_range_ms();
            *test = Some(cutoff_ms.saturating_add(end.saturating_sub(*cutoff_ms) / 2));
        }
        let provenance = Provenance {
            source: "synthetic".into(),
            detail: serde_json::to_string(&syn)?,
            items_label: "synthetic items".into(),
            events_label: "synthetic events".into(),
        };
        prepare::prepare_streaming(
            || generator.items(),
            generator.users(),
            provenance,
            out,
            &cfg,
            &bars,
        )?
    } else {
        let source = if args.dataset == "files" {
            let path = |flag: &str, v: &Option<String>| -> anyhow::Result<PathBuf> {
                v.as_ref()
                    .map(PathBuf::from)
                    .with_context(|| format!("--dataset files needs --{flag} FILE"))
            };
            Source::Files {
                items: path("items", &args.items)?,
                events: path("events", &args.events)?,
                users: args.users.as_ref().map(PathBuf::from),
                on_bad_rows,
            }
        } else {
            if args.items.is_some() || args.events.is_some() || args.users.is_some() {
                bail!(
                    "--items/--events/--users apply to --dataset files or synthetic, not `{}`",
                    args.dataset
                );
            }
            args.dataset.parse::<Source>()?
        };
        let (items_label, events_label) = match &source {
            Source::Files { items, events, .. } => (items.clone(), events.clone()),
            other => (
                format!("{} items", other.name()).into(),
                format!("{} events", other.name()).into(),
            ),
        };
        let raw = source
            .load(&bars)
            .with_context(|| format!("loading dataset `{}`", source.name()))?;
        let provenance = Provenance {
            source: source.name().into(),
            detail: source.provenance(),
            items_label,
            events_label,
        };
        prepare::prepare_raw(raw, provenance, out, &cfg, on_bad_rows, &bars)?
    };
    let c = &info.counts;
    outln!(
        "prepared {} into {}: {} items, {} users, {} events; examples: {} train, {} valid, {} test{}{} ({:.1} s, {:.0} events/s, peak RSS {:.0} MiB)",
        info.provenance.source,
        out.display(),
        c.items,
        c.users,
        c.events,
        c.train,
        c.valid,
        c.test,
        if c.cold_items > 0 { format!("; {} cold items ({} cold targets)", c.cold_items, c.cold_targets) } else { String::new() },
        if c.skipped_rows > 0 { format!("; skipped {} bad rows", c.skipped_rows) } else { String::new() },
        info.prepare_seconds,
        c.events as f64 / info.prepare_seconds.max(1e-9),
        crate::rss::peak_rss_mib().unwrap_or(f64::NAN)
    );
    Ok(())
}
