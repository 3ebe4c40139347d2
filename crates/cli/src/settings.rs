//! A stage's settings as one typed struct, filled from the command line or from a pipeline
//! file's table.
//!
//! Each settings struct derives both `clap::Args` and `serde::Deserialize`, with the same field
//! names: `--cold-items 0.1` on the command line is `cold_items = 0.1` in a `[prepare]` table.
//! Defaults are written once, as clap's `default_value`s; [`defaults`] reads them back for serde,
//! so a table that leaves a setting out gets what the command line would.

use anyhow::{anyhow, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Command, FromArgMatches};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// `T`'s flag ids: its field names, flattened structs included.
fn ids<T: Args>() -> Vec<String> {
    T::augment_args(Command::new("settings"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect()
}

/// Parses `argv` (without the program name) as `twotower {name}` would, returning the parsed
/// struct and the matches (which say where each value came from).
pub fn parse<T: Args + FromArgMatches>(
    name: &str,
    argv: impl IntoIterator<Item = String>,
) -> anyhow::Result<(T, ArgMatches)> {
    let cmd = T::augment_args(Command::new("twotower").no_binary_name(true));
    let matches = cmd
        .try_get_matches_from(argv)
        .map_err(|e| anyhow!("[{name}] settings: {e}"))?;
    let value = T::from_arg_matches(&matches).map_err(|e| anyhow!("[{name}] settings: {e}"))?;
    Ok((value, matches))
}

/// The defaults clap declares for `T`'s flags: for `#[serde(default)]`. Every field of a
/// settings struct has a default or is optional, which `every_settings_struct_has_defaults`
/// checks.
pub fn defaults<T: Args + FromArgMatches>() -> T {
    match parse::<T>("defaults", std::iter::empty()) {
        Ok((value, _)) => value,
        Err(e) => panic!("a settings struct has a required flag: {e}"),
    }
}

/// `T` from a pipeline file's `[section]` table. Every key must be one of `T`'s settings; the
/// error names the section, the key and the settings it could have been.
pub fn from_table<T: Args + DeserializeOwned>(
    table: &toml::Table,
    section: &str,
) -> anyhow::Result<T> {
    let known = ids::<T>();
    if let Some(key) = table.keys().find(|k| !known.contains(k)) {
        bail!(
            "[{section}] `{key}` is not a setting here; the settings are {}",
            known.join(", ")
        );
    }
    T::deserialize(toml::Value::Table(table.clone())).map_err(|e| anyhow!("[{section}] {e}"))
}

/// `base` with every setting that `matches` got from the command line taken from `cli`
/// instead: a pipeline table overridden by flags given after `--`.
pub fn overlay<T: Serialize + DeserializeOwned>(
    base: &T,
    cli: &T,
    matches: &ArgMatches,
) -> anyhow::Result<T> {
    let mut merged = serde_json::to_value(base)?;
    let cli = serde_json::to_value(cli)?;
    for id in matches.ids().map(|id| id.as_str()) {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            if let (Some(m), Some(v)) = (merged.as_object_mut(), cli.get(id)) {
                m.insert(id.to_string(), v.clone());
            }
        }
    }
    Ok(serde_json::from_value(merged)?)
}

/// An optional text setting that a table may also write as a number or a date
/// (`items = 1000000`, `cutoff = 2017-11-01`), as the command line would read it.
pub fn optional_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match toml::Value::deserialize(d)? {
        toml::Value::String(s) => Some(s),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Datetime(t) => Some(t.to_string()),
        other => {
            return Err(serde::de::Error::custom(format!(
                "expected text, a number or a date, not {}",
                other.type_str()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{index::IndexSettings, prepare::PrepareSettings, serve::ServeSettings};

    #[test]
    fn every_settings_struct_has_defaults() {
        let prepare: PrepareSettings = defaults();
        assert_eq!(prepare.dataset, "ml-100k");
        let _: IndexSettings = defaults();
        let _: ServeSettings = defaults();
    }

    #[test]
    fn a_table_takes_the_flags_defaults_and_rejects_unknown_keys_by_name() {
        let table: toml::Table =
            toml::from_str("dataset = 'synthetic'\nitems = 400\ncold_items = 0.1").unwrap();
        let s: PrepareSettings = from_table(&table, "prepare").unwrap();
        assert_eq!(s.items.as_deref(), Some("400"));
        assert_eq!(s.cold_items, 0.1);
        assert_eq!(s.history_len, defaults::<PrepareSettings>().history_len);
        let bad: toml::Table = toml::from_str("cold_itmes = 0.1").unwrap();
        let err = from_table::<PrepareSettings>(&bad, "prepare").unwrap_err();
        assert!(err.to_string().contains("[prepare] `cold_itmes`"), "{err}");
        let wrong_type: toml::Table = toml::from_str("history_len = 'long'").unwrap();
        let err = from_table::<PrepareSettings>(&wrong_type, "prepare").unwrap_err();
        assert!(err.to_string().contains("[prepare]"), "{err}");
    }

    #[test]
    fn flags_given_on_the_command_line_override_the_table_and_nothing_else() {
        let table: toml::Table =
            toml::from_str("addr = '127.0.0.1:6000'\nstrict = true\ndevice = 'cpu'").unwrap();
        let base: ServeSettings = from_table(&table, "serve").unwrap();
        let (cli, matches) =
            parse::<ServeSettings>("serve", ["--addr".into(), "127.0.0.1:7000".into()]).unwrap();
        let merged = overlay(&base, &cli, &matches).unwrap();
        assert_eq!(merged.addr.to_string(), "127.0.0.1:7000");
        assert!(
            merged.strict,
            "a table setting the command line left alone stays"
        );
    }
}
