//! The rows of each table as plain Rust values.
//!
//! These are what the rest of the system works with; `schema` and `table` turn them into Arrow
//! batches and Parquet files and back.

use serde::{Deserialize, Serialize};

/// What a user did. The order of the variants is the stable numeric code used by the model
/// (`code()`), so new types are appended, never inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    View,
    Search,
    AddToCart,
    Watch,
    Purchase,
    Rate,
}

impl EventType {
    /// Every event type, in code order.
    pub const ALL: [EventType; 6] = [
        EventType::View,
        EventType::Search,
        EventType::AddToCart,
        EventType::Watch,
        EventType::Purchase,
        EventType::Rate,
    ];

    /// The name stored in Parquet files and sent over gRPC.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::View => "view",
            EventType::Search => "search",
            EventType::AddToCart => "add_to_cart",
            EventType::Watch => "watch",
            EventType::Purchase => "purchase",
            EventType::Rate => "rate",
        }
    }

    /// Parses a stored name; `None` for anything else.
    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// Embedding index of the type: 1..=6, with 0 kept for padding.
    pub fn code(self) -> i64 {
        self as i64 + 1
    }

    /// Number of embedding rows needed for event types, padding included.
    pub const VOCAB_SIZE: i64 = EventType::ALL.len() as i64 + 1;
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One catalog item. Content only: the model never sees `item_id`, which is what makes a new
/// item recommendable the moment it is indexed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub item_id: u64,
    pub title: String,
    /// `name:value` pairs such as `brand:acme` or `year:1995`.
    pub aspects: Vec<String>,
    /// Category path from root to leaf, or a set of genres.
    pub categories: Vec<String>,
    /// When the item was listed, in ms since the Unix epoch.
    pub created_at_ms: Option<i64>,
}

/// One user and their profile features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub user_id: u64,
    /// `name:value` pairs such as `age:25-34` or `gender:f`.
    pub features: Vec<String>,
}

/// One thing a user did at one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub user_id: u64,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    pub event_type: EventType,
    /// The item acted on; `None` exactly for searches.
    pub item_id: Option<u64>,
    /// The search query; only for searches.
    pub query: Option<String>,
    /// A rating or a quantity.
    pub value: Option<f32>,
}

/// One event of an example's history, relative to the example's target time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    pub event_type: EventType,
    pub item_id: Option<u64>,
    pub query: Option<String>,
    /// Seconds from this event to the target (≥ 0: history is strictly before the target).
    pub gap_s: i64,
}

/// One training or evaluation row: predict `target_item_id` from what came before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub user_id: u64,
    /// Time of the target interaction, ms since the Unix epoch.
    pub ts_ms: i64,
    pub target_item_id: u64,
    /// The user's last L events strictly before the target, oldest first.
    pub history: Vec<HistoryEvent>,
    /// Hour of day (0-23, UTC) of the target time.
    pub hour: u8,
    /// Day of week (0 = Monday, UTC) of the target time.
    pub weekday: u8,
    /// The user's profile features, `name:value`.
    pub user_features: Vec<String>,
}

/// Hour of day and weekday (Monday = 0), in UTC, of a time in ms since the epoch.
pub fn hour_and_weekday(ts_ms: i64) -> (u8, u8) {
    let secs = ts_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let hour = (secs.rem_euclid(86_400) / 3600) as u8;
    // 1970-01-01 was a Thursday (weekday 3 when Monday is 0).
    let weekday = ((days + 3).rem_euclid(7)) as u8;
    (hour, weekday)
}

/// The last millisecond of the year 9999 (UTC): the latest time accepted anywhere. A larger
/// integer is not a date in milliseconds but most likely one in micro- or nanoseconds.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Parses a time given as integer milliseconds since the Unix epoch, or as an RFC 3339 /
/// ISO 8601 date or date-time (UTC when it has no offset), into milliseconds. Dates up to the
/// year 9999 parse (`9999-12-31` is a common "never").
pub fn parse_time_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    match s.parse::<i64>() {
        Ok(ms) => Some(ms),
        Err(_) => arrow::compute::kernels::cast_utils::string_to_datetime(&chrono::Utc, s)
            .ok()
            .map(|t| t.timestamp_millis()),
    }
}

/// Why `ts_ms` is not a usable time, if it is not: before 1970, or after the year 9999.
pub fn check_time_ms(ts_ms: i64) -> Result<(), String> {
    if ts_ms < 0 {
        return Err(format!("negative timestamp {ts_ms}"));
    }
    if ts_ms > MAX_TIME_MS {
        return Err(format!(
            "timestamp {ts_ms} is after the year 9999 as milliseconds since 1970 (the unit \
             expected): is it in micro- or nanoseconds?"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_names_round_trip_and_codes_skip_padding() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            assert!(t.code() >= 1 && t.code() < EventType::VOCAB_SIZE);
        }
        assert_eq!(EventType::parse("click"), None);
    }

    #[test]
    fn hour_and_weekday_of_known_dates() {
        // 1970-01-01 00:00 UTC, a Thursday.
        assert_eq!(hour_and_weekday(0), (0, 3));
        // 2024-01-01 13:30 UTC, a Monday.
        assert_eq!(hour_and_weekday(1_704_115_800_000), (13, 0));
        // Before the epoch: 1969-12-31 23:00 UTC, a Wednesday.
        assert_eq!(hour_and_weekday(-3_600_000), (23, 2));
    }

    #[test]
    fn times_parse_from_ms_dates_and_rfc3339() {
        assert_eq!(parse_time_ms("1704115800000"), Some(1_704_115_800_000));
        assert_eq!(
            parse_time_ms("2024-01-01T13:30:00Z"),
            Some(1_704_115_800_000)
        );
        assert_eq!(
            parse_time_ms("2024-01-01T14:30:00+01:00"),
            Some(1_704_115_800_000)
        );
        assert_eq!(parse_time_ms("2024-01-01"), Some(1_704_067_200_000));
        // Past 2262, where nanoseconds in an i64 end.
        assert_eq!(parse_time_ms("9999-12-31T23:59:59.999Z"), Some(MAX_TIME_MS));
        assert_eq!(parse_time_ms("3000-01-01"), Some(32_503_680_000_000));
        assert_eq!(parse_time_ms("yesterday"), None);
    }
}
